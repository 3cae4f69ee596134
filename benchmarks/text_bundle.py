"""Open-vocabulary bundle sizes and the device cost of a new class name.

    python benchmarks/text_bundle.py                      # the default job's shape: resnet-cifar-m + MiniLM text
    python benchmarks/text_bundle.py --teacher clip-b32   # the ViT-B/32 text tower (random weights)

Writes ``resnet-cifar-m`` bundles (random image weights, image encoder ``int8``, calibrated on 128
seeded CIFAR-10 training images when ``../shared/data`` is present) with
``write_bundle(..., text_encoder=True)`` at ``text_precision`` fp32 and int8, and reports the size
of every file. Then, as the device does it (``load_bundle`` + ``classifier_for_classes``, no head
cache, 1 onnxruntime thread, tokenizer included), times building the head for one class name
with 1 template and with OpenAI's 18 CIFAR templates on open sessions: median and p95 over
``--names`` class names; and once, the first head from a cold start (``load_bundle`` and the
text encoder's session included). The text towers: ``reference`` is the reference teacher's pretrained all-MiniLM-L6-v2
(the default job's text side; needs the ``reference`` extra), ``clip-b32`` the ViT-B/32 text
tower of ``../shared/data/clip-vit-base-patch32`` with random weights. The int8 row's prompt
cosine against fp32 is over every CIFAR-10 prompt. Writes ``outputs/bench-bundle/text-<teacher>.json``.
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
CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
NEW_NAMES = ["red fox", "lynx", "snow leopard", "tram", "hot-air balloon", "espresso machine", "lighthouse",
             "harbour seal", "kingfisher", "motor scooter", "fire truck", "barn owl", "café", "Zürich tram",
             "garden hose", "sea urchin", "cable car", "pelican", "tractor", "dragonfly"]


def load_text_teacher(kind: str):
    from clipcore.loading import load_teacher

    if kind == "reference":
        from clipcore.towers import build_reference_dual_encoder

        return build_reference_dual_encoder("lite2")
    return load_teacher(str(SHARED / "clip-vit-base-patch32"), random_init=True)


def calibration_images(n: int):
    from clipcore.data import DataSpec, load_hf_dataset, resolve_columns

    spec = DataSpec(str(SHARED / "cifar10"), split="train", limit=n, shuffle_seed=0)
    ds = load_hf_dataset(spec)
    column = resolve_columns(ds, spec).image
    return [row[column] for row in ds]


def time_heads(graph, tokenizer, names: Sequence[str], templates: Sequence[str]) -> tuple[float, float]:
    from exports.text_runtime import build_head

    build_head(graph, tokenizer, names[:1], templates)  # warm-up
    times = []
    for name in names:
        start = time.perf_counter()
        build_head(graph, tokenizer, [name], templates)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3), float(np.percentile(times, 95) * 1e3)


def time_first_head(bundle: Path) -> float:
    """``load_bundle`` + ``classifier_for_classes`` for one new name, sessions opened from scratch."""
    from exports.runtime import load_bundle
    from exports.text_runtime import classifier_for_classes

    start = time.perf_counter()
    classifier_for_classes(load_bundle(bundle, threads=1), ["red fox"], ["a photo of a {}."], cache_dir=None)
    return (time.perf_counter() - start) * 1e3


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", choices=("reference", "clip-b32"), default="reference")
    p.add_argument("--names", type=int, default=20)
    p.add_argument("--out", default="outputs/bench-bundle")
    args = p.parse_args(argv)

    from clipcore.templates import get_templates
    from exports.bundle import write_bundle
    from exports.interface import TEXT_ENCODER
    from exports.runtime import OnnxGraph
    from exports.text_runtime import DeviceTokenizer, text_embeddings
    from students import build_student

    teacher = load_text_teacher(args.teacher)
    student = build_student("resnet-cifar-m", teacher=teacher).eval()
    images = calibration_images(128)
    cifar_templates = list(get_templates("openai_cifar"))
    prompts = [t.format(c) for c in CIFAR for t in cifar_templates]
    rows, embeddings = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-text-") as tmp:
        for precision in ("fp32", "int8"):
            bundle = write_bundle(student, CIFAR, "openai_cifar", Path(tmp) / precision, precision="int8",
                                  calibration_images=images, text_encoder=True, text_precision=precision)
            files = {f.name: f.stat().st_size / 2**20 for f in bundle.iterdir()}
            first = time_first_head(bundle)
            graph = OnnxGraph(bundle / "text_encoder.onnx", TEXT_ENCODER, threads=1)
            tokenizer = DeviceTokenizer(bundle / "tokenizer.json")
            embeddings[precision] = text_embeddings(graph, tokenizer, prompts)
            one = time_heads(graph, tokenizer, NEW_NAMES[: args.names], ["a photo of a {}."])
            eighteen = time_heads(graph, tokenizer, NEW_NAMES[: args.names], cifar_templates)
            config = json.loads((bundle / "config.json").read_text())
            rows.append({"text_precision": config["text_encoder"]["precision"], "files_mb": files,
                         "bundle_mb": sum(files.values()), "first_head_with_load_ms": first,
                         "head_1_template_ms": one, "head_18_templates_ms": eighteen})
    rows[1]["prompt_cos_vs_fp32_min"] = float((embeddings["int8"] * embeddings["fp32"]).sum(1).min())
    result = {"teacher": args.teacher, "text_tower": teacher.name, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"text-{args.teacher}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"text tower: {teacher.name}")
    print("| text encoder | bundle MB | image_encoder MB | text_encoder MB | tokenizer MB | head, 1 template: p50 / p95 ms "
          "| head, 18 templates: p50 / p95 ms | first head incl. loading the bundle, ms | min prompt cos vs fp32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = r["files_mb"]
        print(f"| {r['text_precision']} | {r['bundle_mb']:.2f} | {f['image_encoder.onnx']:.2f} | {f['text_encoder.onnx']:.2f} "
              f"| {f['tokenizer.json']:.2f} | {r['head_1_template_ms'][0]:.1f} / {r['head_1_template_ms'][1]:.1f} "
              f"| {r['head_18_templates_ms'][0]:.1f} / {r['head_18_templates_ms'][1]:.1f} "
              f"| {r['first_head_with_load_ms']:.0f} | {r.get('prompt_cos_vs_fp32_min', 1.0):.4f} |")
    return result


if __name__ == "__main__":
    main()
