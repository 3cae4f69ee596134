"""Device latency of an open-vocabulary bundle as ``exports.predict`` runs it: one image, one new class name.

    python benchmarks/bundle_latency.py outputs/general-qat/export/bundle-int8 \\
        --image fp32=outputs/general-qat/export/onnx/image_encoder.fp32.onnx \\
        --text fp32=outputs/general-qat/export/onnx/text_encoder.fp32.onnx --threads 1

Per image: the bundle's image encoder at batch 1 (``onnx_latency.batch1_latency``: random pixels,
calls interleaved in rounds of 100 with any ``--image NAME=PATH`` file, e.g. the fp32 graph it was
quantised from). Per new class name: the head of one class name never seen before, built with
the bundle's own templates by its tokenizer and text encoder, as ``classifier_for_classes`` does
without a head cache (``text_bundle.time_heads``: one warm-up call, then median and p95 over ``--names``
names of ``text_bundle.NEW_NAMES``), for the bundle's text encoder and any ``--text NAME=PATH`` file run with
the same tokenizer. Cold start: ``load_bundle`` + ``classifier_for_classes`` for one name, sessions
opened from scratch, no cache. Prints markdown rows; ``--out FILE`` writes them as JSON too. Run it
on an idle machine: other processes make every number slower.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))  # onnx_latency and text_bundle, beside this script

from onnx_latency import batch1_latency  # noqa: E402
from text_bundle import NEW_NAMES, time_heads  # noqa: E402

from exports.interface import TEXT_ENCODER  # noqa: E402
from exports.runtime import OnnxGraph, load_bundle  # noqa: E402
from exports.text_runtime import DeviceTokenizer, bundled_templates, classifier_for_classes  # noqa: E402


def named_files(items: Sequence[str], flag: str) -> dict[str, str]:
    files = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not Path(path).is_file():
            raise SystemExit(f"{flag} {item!r}: expected NAME=PATH of an existing ONNX file")
        files[name] = path
    return files


def cold_start_ms(bundle: Path, threads: int) -> float:
    start = time.perf_counter()
    classifier_for_classes(load_bundle(bundle, threads=threads), NEW_NAMES[:1], cache_dir=None, threads=threads)
    return (time.perf_counter() - start) * 1e3


def measure(bundle: str | Path, images: dict[str, str] | None = None, texts: dict[str, str] | None = None,
            threads: int = 1, iters: int = 2000, names: int = 20) -> dict:
    """``{"image": {name: (p50, p95)}, "class_name": {name: (p50, p95)}, "cold_start_ms", "templates"}`` in ms;
    the bundle's own files are named ``bundle``."""
    bundle = Path(bundle)
    clf = load_bundle(bundle, threads=threads)
    text = clf.config.get("text_encoder")
    if not text:
        raise SystemExit(f"{bundle}: this bundle has no text encoder, so it has no per-class-name cost to time")
    if not 2 <= names <= len(NEW_NAMES):
        raise SystemExit(f"--names {names}: expected 2..{len(NEW_NAMES)}")
    templates = bundled_templates(clf)
    image = batch1_latency({"bundle": str(bundle / clf.config["image_encoder"]["file"]), **(images or {})},
                           threads, warmup=50, iters=iters)
    tokenizer = DeviceTokenizer(bundle / text["tokenizer"])
    class_name = {name: time_heads(OnnxGraph(path, TEXT_ENCODER, threads=threads), tokenizer, NEW_NAMES[:names],
                                     templates)
                  for name, path in {"bundle": str(bundle / text["file"]), **(texts or {})}.items()}
    return {"bundle": str(bundle), "threads": threads, "templates": len(templates), "image": image,
            "class_name": class_name, "cold_start_ms": cold_start_ms(bundle, threads)}


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", help="a bundle directory written with a text encoder (export.bundle_text=true)")
    p.add_argument("--image", action="append", default=[], metavar="NAME=PATH", help="another image encoder to time beside it")
    p.add_argument("--text", action="append", default=[], metavar="NAME=PATH", help="another text encoder to time beside it")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--iters", type=int, default=2000, help="timed batch-1 image calls per file")
    p.add_argument("--names", type=int, default=20, help="new class names timed per text encoder")
    p.add_argument("--out", default=None, help="also write the result as JSON here")
    args = p.parse_args(argv)
    result = measure(args.bundle, named_files(args.image, "--image"), named_files(args.text, "--text"),
                     args.threads, args.iters, args.names)
    base = result["image"]["bundle"][0]
    print(f"| image encoder (batch 1, {args.threads} thread(s)) | p50 ms | p95 ms | x bundle |\n|---|---|---|---|")
    for name, (p50, p95) in result["image"].items():
        print(f"| {name} | {p50:.3f} | {p95:.3f} | {p50 / base:.2f} |")
    print(f"\n| text encoder (one new class name, {result['templates']} prompts) | p50 ms | p95 ms |\n|---|---|---|")
    for name, (p50, p95) in result["class_name"].items():
        print(f"| {name} | {p50:.2f} | {p95:.2f} |")
    print(f"\ncold start (load_bundle + the head of one new name): {result['cold_start_ms']:.0f} ms")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
