"""Classify images with a zero-shot bundle: ``python -m exports.predict BUNDLE IMAGE... [--json]``.

Needs only onnxruntime, numpy and pillow. An image that cannot be decoded is reported and the
others are still classified; the exit status is then 1 (2 when the bundle itself is unusable).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from clipcore.imaging import ImageDecodeError, decode_image
from exports.runtime import BundleError, InvalidModelError, load_bundle


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m exports.predict", description=__doc__.splitlines()[0])
    p.add_argument("bundle", help="bundle directory written by exports.bundle.write_bundle")
    p.add_argument("images", nargs="+", help="image files (any PIL-readable format and mode)")
    p.add_argument("--top-k", type=int, default=5, help="classes to print per image (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        classifier = load_bundle(args.bundle, threads=args.threads)
    except (BundleError, InvalidModelError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    decoded, errors = [], {}
    for path in args.images:
        try:
            decoded.append((path, decode_image(path, source=path)))
        except ImageDecodeError as exc:
            errors[path] = str(exc)
    predictions = dict(zip(
        [p for p, _ in decoded],
        classifier.predict([img for _, img in decoded], top_k=args.top_k, batch_size=args.batch_size) if decoded else [],
    ))

    if args.json:
        results = [
            {"image": p, "error": errors[p]} if p in errors
            else {"image": p, "predictions": [x.to_dict() for x in predictions[p]]}
            for p in args.images
        ]
        json.dump({"bundle": args.bundle, "precision": classifier.precision, "results": results}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for p in args.images:
            if p in errors:
                print(f"{p}: error: {errors[p]}")
                continue
            print(f"{p}:")
            for x in predictions[p]:
                print(f"  {x.prob:7.4f}  {x.label}")
    for msg in errors.values():
        print(f"error: {msg}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
