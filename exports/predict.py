"""Classify images with a zero-shot bundle: ``python -m exports.predict BUNDLE IMAGE... [--json]``.

``python -m exports.predict BUNDLE --info`` prints what the bundle is and the parity certificate
it carries (bundles built from a parity run). ``--classes "cat,dog,red fox"`` (or
``--classes-file``) classifies among new class names with the bundle's text encoder
(open-vocabulary bundles), building the head on the device and caching it. Needs only
onnxruntime, numpy, pillow and, for ``--classes``, tokenizers. Images are decoded one batch at a
time, so memory does not grow with the number of files; a directory stands for the image files
under it (by extension, recursively, in sorted order). An image that cannot be decoded, or has
more than ``--max-pixels`` pixels, is reported and the others are still classified; the exit
status is then 1 (2 when the bundle itself, the class list or a flag is unusable).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from clipcore.imaging import ImageDecodeError, decode_image
from clipcore.templates import get_templates
from clipcore.paths import output_path_problem
from exports.runtime import (BundleClassifier, BundleError, InvalidModelError, NonFiniteOutputError, Prediction,
                             load_bundle)
from exports.text_runtime import DEFAULT_CACHE, bundled_templates, classifier_for_classes


DEFAULT_MAX_PIXELS = 50_000_000  # a 50-megapixel photo decodes to 150 MB; past that, refuse the image


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m exports.predict", description=__doc__.splitlines()[0])
    p.add_argument("bundle", help="bundle directory written by exports.bundle.write_bundle")
    p.add_argument("images", nargs="*",
                   help="image files (any PIL-readable format and mode), or directories of them (searched recursively)")
    p.add_argument("--info", action="store_true", help="print the bundle's model, precision and parity certificate")
    p.add_argument("--classes", default=None, help="comma-separated class names (needs a bundle with a text encoder)")
    p.add_argument("--classes-file", default=None, help="class names: a JSON list, or one name per line")
    p.add_argument("--templates", action="append", default=None, metavar="TEMPLATE",
                   help="prompt template with '{}' (repeatable) or a set name (simple, openai_cifar, openai_imagenet); "
                        "default: the bundle's own")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help=f"where built heads are kept (default {DEFAULT_CACHE})")
    p.add_argument("--top-k", type=int, default=5, help="classes to print per image (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.add_argument("--batch-size", type=int, default=32, help="images decoded and run together (default 32)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse an image with more pixels, before decoding it (default {DEFAULT_MAX_PIXELS:,})")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    return p


def image_paths(arguments: Sequence[str]) -> list[str]:
    """``arguments`` with each directory replaced by the image files under it (an extension PIL reads, hidden files
    and folders left out), sorted; files are kept as given, whatever their extension.

    Raises:
        FileNotFoundError: a directory with no image file under it.
    """
    extensions = {ext.lower() for ext in Image.registered_extensions()}
    paths: list[str] = []
    for argument in arguments:
        folder = Path(argument)
        if not folder.is_dir():
            paths.append(argument)
            continue
        found = sorted(str(f) for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in extensions
                       and not any(part.startswith(".") for part in f.relative_to(folder).parts))
        if not found:
            raise FileNotFoundError(f"{argument}: no image files under this directory (looked for the extensions "
                                    "PIL reads: .jpg, .png, .webp, ...)")
        paths.extend(found)
    return paths


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
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.images and not args.info:
        parser.error("give IMAGE files to classify, or --info")
    for flag, value in (("--batch-size", args.batch_size), ("--top-k", args.top_k), ("--max-pixels", args.max_pixels)):
        if value < 1:
            print(f"error: {flag} must be a positive integer, got {value}", file=sys.stderr)
            return 2
    try:
        images = image_paths(args.images)
        names = requested_classes(args)  # the flags first: a wrong one fails before the bundle loads
        templates = requested_templates(args.templates)
        problem = names is not None and output_path_problem(args.cache_dir, "dir")
        if problem:
            raise BundleError(f"--cache-dir {args.cache_dir}: {problem}")
        classifier = load_bundle(args.bundle, threads=args.threads)
        if names is not None:
            templates = templates or bundled_templates(classifier)
            classifier = classifier_for_classes(classifier, names, templates, cache_dir=args.cache_dir,
                                                threads=args.threads)
    except (BundleError, InvalidModelError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.info:
        print_info(classifier, args.json)
        if not args.images:
            return 0

    try:
        predictions, errors = predict_files(classifier, images, args.top_k, args.batch_size, args.max_pixels)
    except NonFiniteOutputError as exc:  # a broken model: nothing is printed rather than NaN for every class
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        results = [
            {"image": p, "error": errors[i]} if i in errors
            else {"image": p, "predictions": [x.to_dict() for x in predictions[i]]}
            for i, p in enumerate(images)
        ]
        json.dump({"bundle": args.bundle, "precision": classifier.precision, "results": results}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for i, p in enumerate(images):
            if i in errors:
                print(f"{p}: error: {errors[i]}")
                continue
            print(f"{p}:")
            for x in predictions[i]:
                print(f"  {x.prob:7.4f}  {x.label}")
    for msg in errors.values():
        print(f"error: {msg}", file=sys.stderr)
    return 1 if errors else 0


def requested_classes(args: argparse.Namespace) -> list[str] | None:
    """``--classes`` / ``--classes-file`` as a list, or None for the bundled classes.

    Raises:
        BundleError: both given, or an unreadable / empty file (the message names it).
    """
    if args.classes is not None and args.classes_file is not None:
        raise BundleError("give --classes or --classes-file, not both")
    if args.classes is not None:
        return distinct([c.strip() for c in args.classes.split(",") if c.strip()], "--classes")
    if args.classes_file is None:
        return None
    path = Path(args.classes_file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"--classes-file {path}: unreadable ({type(exc).__name__}: {exc})") from exc
    if text.lstrip().startswith(("[", "{", '"')):  # JSON (an object would otherwise be one class named '{"a":1}')
        try:
            names = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BundleError(f"--classes-file {path}: invalid JSON ({exc})") from exc
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise BundleError(f"--classes-file {path}: a JSON file must hold a list of strings, got a "
                              f"{type(names).__name__}")
    else:
        names = text.splitlines()
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise BundleError(f"--classes-file {path}: no class names")
    return distinct(names, f"--classes-file {path}")


def distinct(names: list[str], source: str) -> list[str]:
    """``names``, refused when two are equal ignoring case and spacing: the tokenizers lower-case, so
    they would get identical head rows and split every vote (as clipcore.zeroshot.validate_classnames)."""
    seen: dict[str, str] = {}
    for name in names:
        key = " ".join(name.lower().split())
        if key in seen:
            raise BundleError(f"{source}: {seen[key]!r} and {name!r} are the same class name (case and spacing "
                              "ignored); class names must be distinct")
        seen[key] = name
    return names


def requested_templates(items: list[str] | None) -> list[str] | None:
    if not items:
        return None
    try:
        return [t for item in items for t in get_templates(item)]
    except ValueError as exc:
        raise BundleError(f"--templates: {exc}") from None


def print_info(classifier: BundleClassifier, as_json: bool) -> None:
    """The bundle's identity and, when it has one, its parity certificate."""
    cfg, cert = classifier.config, classifier.certificate
    if as_json:
        from exports.runtime import certified_files

        checked = None if cert is None else sorted(certified_files(cert, cfg))  # verified by load_bundle
        json.dump({"bundle": str(classifier.path), "config": cfg, "certificate": cert,
                   "certificate_matches_files": checked}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    print(f"bundle {classifier.path}: {cfg.get('model')} ({cfg.get('precision')}), {len(classifier.classnames)} classes, "
          f"{cfg.get('embed_dim')}-d embeddings, input {classifier.transform.output_size}")
    if cert is None:
        print("certificate: none (written by write_bundle, not from a parity run)")
    else:
        from exports.certificate import format_certificate
        from exports.runtime import certified_files

        print(format_certificate(cert))
        print(f"  the shipped {', '.join(certified_files(cert, cfg))} have the sha256 this certificate names "
              "(checked when the bundle was loaded)")


if __name__ == "__main__":
    sys.exit(main())
