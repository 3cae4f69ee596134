"""Transformer students at fp16, int8-dynamic and w8a16: size, latency, closeness, fp16 numerics.

    python benchmarks/transformer_precisions.py                        # vit-tiny-cifar and ViT-B/32
    python benchmarks/transformer_precisions.py --models vit-tiny-cifar --calibration-images 32

Random weights (no trained transformer student or CLIP exists on these machines): the numbers are
size, speed, how far each variant's embeddings move from its fp32 graph (cosine over CIFAR-10 test
images or CIFAR-10 prompts), and whether the fp16 graph keeps LayerNorm, softmax and reductions
in fp32 (:mod:`exports.fp16_check`). Agreement of a *trained* student is the parity report's job.

Models: ``vit-tiny-cifar`` (a CLIP student: ViT-Ti image tower at 32 px and its own small text
tower, built against the ViT-B/32 tokenizer) and ``clip-b32`` (the ViT-B/32 architecture of
``../shared/data/clip-vit-base-patch32``). Image encoders are timed at batch 1 (median of
``--iters`` calls, 1 onnxruntime thread); w8a16 is calibrated on ``--calibration-images`` seeded
CIFAR-10 training images (prompts for text towers). Writes ``outputs/bench-export/transformer_precisions.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
VARIANTS = ("fp32", "fp16", "int8-dynamic", "w8a16")


def load_model(name: str):
    from clipcore.loading import load_teacher
    from students import build_student

    teacher = load_teacher(str(SHARED / "clip-vit-base-patch32"), random_init=True)
    return teacher if name == "clip-b32" else build_student(name, teacher=teacher)


def cifar(split: str, n: int, transform) -> np.ndarray:
    from clipcore.data import DataSpec, ImageDataset, make_loader

    ds = ImageDataset.from_spec(DataSpec(str(SHARED / "cifar10"), split=split, limit=n, shuffle_seed=0),
                                {"m": transform})
    return np.concatenate([b["pixel_values_m"].numpy() for b in make_loader(ds, batch_size=32)])


def tokens(model, texts: Sequence[str]) -> dict[str, np.ndarray]:
    t = model.tokenize(list(texts))
    return {"input_ids": t["input_ids"].numpy(), "attention_mask": t["attention_mask"].numpy()}


def median_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def tower_rows(kind: str, fp32: Path, spec, feeds: dict, calib: list[dict], work: Path, iters: int) -> list[dict]:
    from exports.fp16_check import describe, fp32_islands
    from exports.precision import ArrayCalibrationReader, make_variant
    from exports.runtime import OnnxGraph

    out_name = spec.outputs[0].name
    one = {k: v[:1] for k, v in feeds.items()}
    ref = None
    rows = []
    for variant in VARIANTS:
        path = fp32 if variant == "fp32" else work / f"{kind}.{variant}.onnx"
        if variant != "fp32":
            make_variant(fp32, path, variant, ArrayCalibrationReader(calib) if variant == "w8a16" else None)
        graph = OnnxGraph(path, spec, threads=1)
        emb = np.concatenate([graph.run({k: v[i : i + 32] for k, v in feeds.items()})[out_name]
                              for i in range(0, len(next(iter(feeds.values()))), 32)]).astype(np.float64)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        ref = emb if ref is None else ref
        cos = (emb * ref).sum(1)
        row = {"tower": kind, "variant": variant, "mb": path.stat().st_size / 2**20,
               "b1_ms": median_ms(lambda: graph.run(one), iters), "cos_min": float(cos.min()),
               "cos_mean": float(cos.mean())}
        if variant == "fp16":
            row["fp16_numerics"] = describe(fp32_islands(path))
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="vit-tiny-cifar,clip-b32")
    p.add_argument("--calibration-images", type=int, default=16)
    p.add_argument("--eval-images", type=int, default=256)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--out", default="outputs/bench-export")
    args = p.parse_args(argv)

    from clipcore.templates import get_templates
    from exports.interface import IMAGE_ENCODER, TEXT_ENCODER
    from exports.onnx_export import export_image_encoder, export_text_encoder

    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    prompts = [t.format(c) for c in names for t in get_templates("openai_cifar")]
    result = {"rows": []}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        model = load_model(name).eval()
        with tempfile.TemporaryDirectory(prefix="bench-tf-") as tmp:
            work = Path(tmp)
            pixels = cifar("test", args.eval_images, model.image_transform)
            calib_pixels = cifar("train", args.calibration_images, model.image_transform)
            image_calib = [{"pixel_values": calib_pixels[i : i + 4]} for i in range(0, len(calib_pixels), 4)]
            rows = tower_rows("image", export_image_encoder(model, work / "image.onnx"), IMAGE_ENCODER,
                              {"pixel_values": pixels}, image_calib, work, args.iters)
            text_feeds = tokens(model, prompts)
            text_calib = [tokens(model, prompts[i : i + 8]) for i in range(0, 8 * max(1, args.calibration_images // 8), 8)]
            rows += tower_rows("text", export_text_encoder(model, work / "text.onnx"), TEXT_ENCODER, text_feeds,
                               text_calib, work, args.iters)
        for r in rows:
            r["model"] = name
            print(json.dumps(r))
        result["rows"] += rows
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "transformer_precisions.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| model | tower | variant | MB | b1 ms | cos min / mean vs fp32 | fp16 numerics |")
    print("|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['model']} | {r['tower']} | {r['variant']} | {r['mb']:.2f} | {r['b1_ms']:.2f} | "
              f"{r['cos_min']:.4f} / {r['cos_mean']:.4f} | {r.get('fp16_numerics', '')} |")
    return result


if __name__ == "__main__":
    main()
