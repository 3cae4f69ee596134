"""Average the weights of image students trained from the same start (a "model soup").

    python distill/train.py --config configs/general.yaml optim.max_steps=3000 order_seed=1 output_dir=outputs/g1
    python distill/train.py --config configs/general.yaml optim.max_steps=3000 order_seed=2 output_dir=outputs/g2
    python -m distill.soup outputs/g1/final outputs/g2/final --out outputs/general-soup

Runs that differ only in the order of their batches (``order_seed``) start from the same weights,
the same random head included, and stay close enough that the average of their weights is a
model of its own (Wortsman et al., 2022, "Model soups"): one student, the cost of one at inference.
Runs from different ``seed`` values start from different random heads; their average is not a model,
so the ingredients must agree on everything ``student.json`` records (architecture, head, input
transform, teacher). Batch-norm statistics are averaged as they are; a QAT student is refused (its
activation ranges describe its own weights, not the average).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import torch

from distill.cli import debug_requested, run_cli
from exports.bundle_files import sha256_file
from students.checkpoint import STUDENT_FILE, WEIGHTS_FILE
from students.qat import QAT_RANGES_FILE

SOUP_FILE = "soup.json"


class SoupError(ValueError):
    """Ingredients that cannot be averaged: the message names the directory and the key."""


def _meta(directory: Path) -> dict:
    path = directory / STUDENT_FILE
    if not path.is_file():
        raise SoupError(f"{directory}: no {STUDENT_FILE} (not a saved student)")
    meta = json.loads(path.read_text())
    if meta.get("kind") != "frozen_text":
        raise SoupError(f"{path}: kind {meta.get('kind')!r}; a soup averages image students ('frozen_text')")
    if (directory / QAT_RANGES_FILE).is_file():
        raise SoupError(f"{directory}: a QAT student ({QAT_RANGES_FILE}): its activation ranges describe its own "
                        "weights, not an average; average the fp32 students, then fine-tune with QAT")
    return meta


def _comparable(meta: dict) -> dict:
    """What must agree: everything but the teacher's path (a fingerprint says whether it is the same)."""
    teacher = dict(meta.get("teacher") or {})
    teacher.pop("name_or_path", None)
    return {**meta, "teacher": teacher}


def check_ingredients(directories: Sequence[Path]) -> dict:
    """The first ingredient's ``student.json``, once every one agrees with it.

    Raises:
        SoupError: fewer than two, or one that differs (naming it and the first differing key).
    """
    if len(directories) < 2:
        raise SoupError(f"a soup needs at least two students, got {len(directories)}")
    first = _meta(directories[0])
    for directory in directories[1:]:
        meta = _meta(directory)
        a, b = _comparable(first), _comparable(meta)
        differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if differ:
            key = differ[0]
            raise SoupError(f"{directory / STUDENT_FILE}: {key} = {b.get(key)!r}, but {directories[0]} has "
                            f"{a.get(key)!r}: only students of one architecture, head, transform and teacher average")
    return first


def average_weights(paths: Sequence[Path]) -> dict[str, torch.Tensor]:
    """The mean of each floating tensor (accumulated in float64); integer tensors (batch-norm counters)
    are taken from the first. Raises SoupError for a missing key or a shape that differs."""
    from safetensors.torch import load_file

    tensors = [load_file(str(p)) for p in paths]
    first = tensors[0]
    for path, other in zip(paths[1:], tensors[1:]):
        if set(other) != set(first):
            extra = sorted(set(other) ^ set(first))[:3]
            raise SoupError(f"{path}: tensors {extra} are in one ingredient and not the other")
        for key, value in other.items():
            if value.shape != first[key].shape:
                raise SoupError(f"{path}: {key} has shape {tuple(value.shape)}, {paths[0]} {tuple(first[key].shape)}")
    out = {}
    for key, value in first.items():
        if value.is_floating_point():
            out[key] = (sum(t[key].double() for t in tensors) / len(tensors)).to(value.dtype).contiguous()
        else:
            out[key] = value.clone()
    return out


def make_soup(directories: Sequence[str | Path], out: str | Path) -> Path:
    """Write the uniform average of ``directories`` (saved image students) to ``out``, a new directory.

    ``out`` gets the averaged ``model.safetensors``, the ingredients' ``student.json`` and
    ``soup.json`` (each ingredient's path and weights' sha256); it loads with ``students.load_student``.
    """
    from safetensors.torch import save_file

    from students.checkpoint import load_student

    directories = [Path(d) for d in directories]
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SoupError(f"--out {out} exists and is not empty")
    meta = check_ingredients(directories)
    weights = [d / WEIGHTS_FILE for d in directories]
    for path in weights:
        if not path.is_file():
            raise SoupError(f"{path}: missing")
    soup = average_weights(weights)
    out.mkdir(parents=True, exist_ok=True)
    save_file(soup, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / STUDENT_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    record = {"method": "uniform", "ingredients": [{"path": str(d), "weights_sha256": sha256_file(w)}
                                                   for d, w in zip(directories, weights)]}
    (out / SOUP_FILE).write_text(json.dumps(record, indent=1))
    load_student(out, with_teacher=False)  # strict: the soup loads as a student before this returns
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m distill.soup", description=__doc__.split("\n\n")[0])
    p.add_argument("students", nargs="+", help="saved image students (train.py's OUTPUT_DIR/final), two or more")
    p.add_argument("--out", required=True, help="new directory for the averaged student")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error (also: CLIP_DISTILL_DEBUG=1)")
    return p


def main(argv: Sequence[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    out = make_soup(args.students, args.out)
    print(out)
    return str(out)


def cli(argv: Sequence[str] | None = None) -> int:
    """Exit 0 written, 2 bad input (ingredients that differ, a QAT student, a non-empty --out)."""
    return run_cli(lambda: main(argv), debug_requested(argv))


if __name__ == "__main__":
    sys.exit(cli())
