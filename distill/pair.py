"""Pair a saved image model with a saved text student into one model directory.

    python -m distill.pair --image outputs/general/final --text outputs/text-student/final \\
        --out outputs/general-text-student
    python -m distill.benchmark --reference outputs/reference-zeroshot/final \\
        --model outputs/general/final --model outputs/general-text-student --suite suites/shared.yaml --out OUT

The pair (``students.save_pair``) holds copies of both and loads with ``students.load_model`` as a
dual encoder: the image model's image side and logit scale, the text student's text side. Both
are loaded and their embedding sizes compared before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from distill.cli import debug_requested, run_cli
from students import save_pair


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m distill.pair", description=__doc__.split("\n\n")[0])
    p.add_argument("--image", required=True, help="image model directory (an image-only student, a teacher, ...)")
    p.add_argument("--text", required=True, help="text student directory (python -m distill.text_student)")
    p.add_argument("--out", required=True, help="new directory for the pair")
    p.add_argument("--name", default=None, help="the pair's name (default: IMAGE_NAME+TEXT_NAME)")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error (also: CLIP_DISTILL_DEBUG=1)")
    return p


def main(argv: Sequence[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    out = save_pair(args.image, args.text, args.out, name=args.name)
    print(out)
    return str(out)


def cli(argv: Sequence[str] | None = None) -> int:
    """Exit 0 written, 2 bad input (a missing model, mismatched embedding sizes, a non-empty --out)."""
    return run_cli(lambda: main(argv), debug_requested(argv))


if __name__ == "__main__":
    sys.exit(cli())
