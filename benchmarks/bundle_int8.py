"""Edge-bundle size and latency per precision for one student: is the "int8" bundle int8?

    python benchmarks/bundle_int8.py                          # resnet-cifar-m at 32 px (the default job's)
    python benchmarks/bundle_int8.py --student vit-tiny-cifar --threads 2

Builds the student with random weights against a 512-d teacher (the ViT-B/32 architecture of
``../shared/data/clip-vit-base-patch32`` with random weights, else a tiny CLIP: only the head's
output size depends on it), writes one bundle per precision with
:func:`exports.bundle.write_bundle` (``int8`` calibrated on seeded CIFAR-10 training images when
``../shared/data`` is present, else random pixels), then times each bundle's image encoder as
the runtime opens it: batch 1 (median and p95 over ``--iters`` calls) and batch 32. The embedding
cosine against the fp32 bundle on the calibration images shows the quantisation error; accuracy
and agreement need a trained student (the parity report of a training run). Writes
``outputs/bench-bundle/<student>.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
PRECISIONS = ("fp32", "int8-dynamic", "int8")


def teacher_and_images(work: Path, n: int):
    from clipcore.data import DataSpec, load_hf_dataset, resolve_columns
    from clipcore.loading import load_teacher
    from clipcore.testing import make_tiny_clip

    vitb = SHARED / "clip-vit-base-patch32"
    teacher = (load_teacher(str(vitb), random_init=True) if vitb.is_dir()
               else load_teacher(str(make_tiny_clip(work / "teacher", seed=0))))
    if (SHARED / "cifar10").is_dir():
        spec = DataSpec(str(SHARED / "cifar10"), split="train", limit=n, shuffle_seed=0)
        ds = load_hf_dataset(spec)
        column = resolve_columns(ds, spec).image
        return teacher, [row[column] for row in ds], f"{spec.label}, {n} seeded images"
    rng = np.random.default_rng(0)
    from PIL import Image

    return teacher, [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)], "random pixels"


def time_encoder(clf, batch: int, iters: int) -> tuple[float, float]:
    h, w = clf.transform.output_size
    pixels = np.random.default_rng(0).standard_normal((batch, 3, h, w), dtype=np.float32)
    feed = {"pixel_values": pixels}
    for _ in range(3):
        clf.image_encoder.run(feed)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        clf.image_encoder.run(feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3), float(np.percentile(times, 95) * 1e3)


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", default="resnet-cifar-m")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--calibration-images", type=int, default=128)
    p.add_argument("--out", default="outputs/bench-bundle")
    args = p.parse_args(argv)

    from exports.bundle import write_bundle
    from exports.runtime import load_bundle
    from students import build_student

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-bundle-") as tmp:
        work = Path(tmp)
        teacher, images, source = teacher_and_images(work, args.calibration_images)
        student = build_student(args.student, teacher=teacher).eval()
        ref = None
        for precision in PRECISIONS:
            bundle = write_bundle(student, ["cat", "dog"], "simple", work / precision, precision=precision,
                                  calibration_images=images)
            clf = load_bundle(bundle, threads=args.threads)
            emb = clf.embed(images[:64])
            ref = emb if ref is None else ref
            b1 = time_encoder(clf, 1, args.iters)
            b32 = time_encoder(clf, 32, max(10, args.iters // 10))
            rows.append({
                "precision": precision, "scheme": clf.precision,
                "image_encoder_mb": (bundle / "image_encoder.onnx").stat().st_size / 2**20,
                "bundle_mb": sum(f.stat().st_size for f in bundle.iterdir()) / 2**20,
                "b1_p50_ms": b1[0], "b1_p95_ms": b1[1], "b32_p50_ms": b32[0],
                "cos_vs_fp32_min": float((emb * ref).sum(1).min()),
            })
    fp32 = rows[0]
    for r in rows:
        r["size_vs_fp32"] = r["bundle_mb"] / fp32["bundle_mb"]
        r["b1_vs_fp32"] = r["b1_p50_ms"] / fp32["b1_p50_ms"]
        r["b32_vs_fp32"] = r["b32_p50_ms"] / fp32["b32_p50_ms"]
    import onnxruntime

    result = {"student": args.student, "threads": args.threads, "calibration": source, "rows": rows,
              "onnxruntime": onnxruntime.__version__, "cpu": platform.processor() or platform.machine()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.student}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.student}, {args.threads} thread(s), calibration: {source}")
    print("| bundle | scheme | bundle MB | × fp32 | b1 p50 ms | × fp32 | b32 ms | × fp32 | min cos vs fp32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['scheme']} | {r['bundle_mb']:.2f} | {r['size_vs_fp32']:.2f} | "
              f"{r['b1_p50_ms']:.3f} | {r['b1_vs_fp32']:.2f} | {r['b32_p50_ms']:.2f} | {r['b32_vs_fp32']:.2f} | "
              f"{r['cos_vs_fp32_min']:.4f} |")
    return result


if __name__ == "__main__":
    main()
