"""Classify images with a zero-shot bundle: ``python -m exports.predict BUNDLE IMAGE... [--json]``.

Needs only onnxruntime, numpy and pillow. Images are decoded one batch at a time, so memory does
not grow with the number of files. An image that cannot be decoded, or has more than
``--max-pixels`` pixels, is reported and the others are still classified; the exit status is then
1 (2 when the bundle itself is unusable or a flag is out of range).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import numpy as np

from clipcore.imaging import ImageDecodeError, decode_image
from exports.runtime import BundleClassifier, BundleError, InvalidModelError, Prediction, load_bundle


DEFAULT_MAX_PIXELS = 50_000_000  # a 50-megapixel photo decodes to 150 MB; past that, refuse the image


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m exports.predict", description=__doc__.splitlines()[0])
    p.add_argument("bundle", help="bundle directory written by exports.bundle.write_bundle")
    p.add_argument("images", nargs="+", help="image files (any PIL-readable format and mode)")
    p.add_argument("--top-k", type=int, default=5, help="classes to print per image (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.add_argument("--batch-size", type=int, default=32, help="images decoded and run together (default 32)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse an image with more pixels, before decoding it (default {DEFAULT_MAX_PIXELS:,})")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    return p


def predict_files(classifier: BundleClassifier, paths: Sequence[str], top_k: int, batch_size: int,
                  max_pixels: int) -> tuple[dict[int, list[Prediction]], dict[int, str]]:
    """Predictions and decode errors by position in ``paths``.

    Each image is decoded and preprocessed alone, one batch at a time, so at most one decoded
    image and one batch of model inputs are in memory, whatever the number of files.
    """
    predictions: dict[int, list[Prediction]] = {}
    errors: dict[int, str] = {}
    for start in range(0, len(paths), batch_size):
        kept, pixels = [], []
        for i in range(start, min(start + batch_size, len(paths))):
            try:
                pixels.append(classifier.transform(decode_image(paths[i], source=paths[i], max_pixels=max_pixels)))
                kept.append(i)
            except ImageDecodeError as exc:
                errors[i] = str(exc)
        if kept:
            predictions.update(zip(kept, classifier.predict_pixels(np.stack(pixels), top_k)))
    return predictions, errors


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag, value in (("--batch-size", args.batch_size), ("--top-k", args.top_k), ("--max-pixels", args.max_pixels)):
        if value < 1:
            print(f"error: {flag} must be a positive integer, got {value}", file=sys.stderr)
            return 2
    try:
        classifier = load_bundle(args.bundle, threads=args.threads)
    except (BundleError, InvalidModelError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    predictions, errors = predict_files(classifier, args.images, args.top_k, args.batch_size, args.max_pixels)
    if args.json:
        results = [
            {"image": p, "error": errors[i]} if i in errors
            else {"image": p, "predictions": [x.to_dict() for x in predictions[i]]}
            for i, p in enumerate(args.images)
        ]
        json.dump({"bundle": args.bundle, "precision": classifier.precision, "results": results}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for i, p in enumerate(args.images):
            if i in errors:
                print(f"{p}: error: {errors[i]}")
                continue
            print(f"{p}:")
            for x in predictions[i]:
                print(f"  {x.prob:7.4f}  {x.label}")
    for msg in errors.values():
        print(f"error: {msg}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
