"""Give a saved image-only student the teacher's share along the teacher's mean embedding.

    python -m distill.mean_share --student outputs/general/final --out outputs/general-share \\
        --data ../shared/data/tiny-imagenet:train --data ../shared/data/scene-photos:train

Without ``--data`` the mean is taken over the sources the student was trained on (its
``training_config.yaml``), as ``student.mean_share: true`` takes it before training.

A student that cannot see what decides the teacher's embedding learns its expectation, nearer the
mean of all embeddings than the teacher's own, so its component along that mean varies from image
to image more than the teacher's does, and image->text retrieval ranks the same captions high for
every image (docs/general-student.md). This embeds ``--limit`` seeded images of each ``--data``
source (training data: never a set the student is scored on) with the student's teacher, takes the
mean m of those unit embeddings, and writes a copy of the student whose every image embedding has
the component |m| along m's direction, its residual direction unchanged
(``FrozenTextStudent.set_mean_share``). Nothing is trained; the copy exports and loads as any student.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch

from clipcore.data import DataSpec, ImageDataset, load_hf_dataset, make_loader, resolve_columns
from distill.cli import debug_requested, run_cli
from distill.config import DataConfig, load_config
from distill.evaluate import embed_images
from students import load_model, save_student
from students.image_only import FrozenTextStudent


MEAN_SHARE_IMAGES = 1000  # seeded images per source (--limit; student.mean_share takes as many)
TRAINING_CONFIG = "training_config.yaml"  # written beside every trained student (distill/final.py)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m distill.mean_share", description=__doc__.split("\n\n")[0])
    p.add_argument("--student", required=True, help="a saved image-only student (its text side is the teacher's)")
    p.add_argument("--out", required=True, help="new directory for the student with the share")
    p.add_argument("--data", action="append", default=None, metavar="PATH[:SPLIT]",
                   help="training images the teacher's mean is taken over (repeatable; default: the data.train "
                        "sources of the student's training_config.yaml)")
    p.add_argument("--limit", type=int, default=MEAN_SHARE_IMAGES,
                   help=f"seeded images per --data source (default {MEAN_SHARE_IMAGES})")
    p.add_argument("--teacher", default=None, help="the teacher (default: the one recorded with the student)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--debug", action="store_true", help="print the traceback of an error (also: CLIP_DISTILL_DEBUG=1)")
    return p


def train_sources(data: DataConfig) -> list[str]:
    """``data.train`` as ``PATH:SPLIT`` strings, one per source."""
    return [f"{src.path}:{src.split}" for src in data.sources()]


def recorded_sources(student_dir: str | Path) -> list[str]:
    """The training sources recorded beside a trained student.

    Raises:
        FileNotFoundError: there is no ``training_config.yaml`` beside it (say ``--data`` instead).
    """
    path = Path(student_dir) / TRAINING_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"--student {student_dir}: no {TRAINING_CONFIG} records what it was trained on; "
                                "name the training images with --data PATH[:SPLIT]")
    return train_sources(load_config(path).data)


def embed_source(model, source: str, limit: int, batch_size: int) -> torch.Tensor:
    """``model``'s unit image embeddings of ``limit`` seeded images of ``source`` (``PATH`` or ``PATH:SPLIT``)."""
    path, sep, split = source.rpartition(":")
    if not sep or "/" in split:  # no split given (a path may hold ':' only before its last '/')
        path, split = source, None
    spec = DataSpec(path, split=split, limit=limit, shuffle_seed=0)
    ds = load_hf_dataset(spec)
    data = ImageDataset(ds, {"model": model.image_transform}, resolve_columns(ds, spec), name=source)
    return embed_images(model, make_loader(data, batch_size), desc=source, progress=False).embeddings


def teacher_mean(teacher, sources: Sequence[str], limit: int, batch_size: int) -> torch.Tensor:
    """The mean of the teacher's unit image embeddings over ``limit`` seeded images per source."""
    return torch.cat([embed_source(teacher, s, limit, batch_size) for s in sources]).mean(0)


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out}: exists and is not an empty directory")
    if args.limit < 1:
        raise ValueError(f"--limit {args.limit}: expected at least 1 image per source")
    student = load_model(args.student, teacher=args.teacher)
    if not isinstance(student, FrozenTextStudent) or student.teacher is None:
        raise ValueError(f"--student {args.student}: {type(student).__name__} is not an image-only student with its "
                         "teacher; the share is taken from the teacher whose text side it uses")
    sources = args.data or recorded_sources(args.student)
    mean = teacher_mean(student.teacher, sources, args.limit, args.batch_size)
    share = float(mean.norm())
    student.set_mean_share(mean, share)
    save_student(student, out)
    print(f"{out}: share {share:.4f} along the teacher's mean image embedding ({len(sources)} sources x "
          f"<= {args.limit} images: {', '.join(sources)})")
    return {"out": str(out), "share": share, "sources": sources}


def cli(argv: Sequence[str] | None = None) -> int:
    """Exit 0 written, 2 bad input (a missing model or data, a student without a teacher, a non-empty --out, no
    --data and no training_config.yaml beside the student)."""
    return run_cli(lambda: main(argv), debug_requested(argv))


if __name__ == "__main__":
    sys.exit(cli())
