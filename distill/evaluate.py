"""Evaluate a CLIP-family model: zero-shot classification, retrieval and a linear probe.

Usage:
    python -m distill.evaluate --model openai/clip-vit-base-patch32 --data uoft-cs/cifar10 --split test
    python -m distill.evaluate --model DIR --data ../shared/data/coco-mini --split train --task retrieval
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from clipcore.classnames import classnames_for
from clipcore.data import DataSpec, ImageDataset, flatten_captions, load_hf_dataset, make_loader, resolve_columns
from clipcore.dual_encoder import DualEncoder
from clipcore.linear_probe import linear_probe
from clipcore.metrics import classification_metrics, retrieval_metrics
from clipcore.prompts import load_templates
from clipcore.templates import get_templates
from clipcore.zeroshot import build_classifier, validate_zeroshot_inputs
from distill.cli import debug_requested, output_path_problem, run_cli
from students import load_model

log = logging.getLogger(__name__)
TASKS = ("zeroshot", "retrieval", "linear-probe")
FORMAT_VERSION = 1


@dataclass
class EmbeddedImages:
    """Image embeddings of one split, in dataset order, without the rows that failed to decode."""

    embeddings: torch.Tensor  # (N, D) float32, normalised
    labels: torch.Tensor | None  # (N,) or None
    indices: torch.Tensor  # (N,) dataset row of each embedding
    num_failed: int
    seconds: float


@torch.no_grad()
def embed_images(
    model: DualEncoder, loader, key: str = "model", desc: str = "images", progress: bool = True
) -> EmbeddedImages:
    """Run ``model.encode_image`` over a loader of :class:`ImageDataset` batches."""
    model.eval()
    embs, labels, indices, failed = [], [], [], 0
    start = time.perf_counter()
    for batch in tqdm(loader, desc=desc, disable=not progress, unit="batch"):
        failed += int(batch.get("num_failed", 0))
        if batch["index"].numel() == 0:
            continue
        pixels = batch[f"pixel_values_{key}"].to(model.device)
        embs.append(model.encode_image(pixels).cpu())
        indices.append(batch["index"])
        if "label" in batch:
            labels.append(batch["label"])
    if not embs:
        raise ValueError(f"no image could be decoded ({failed} failed)")
    return EmbeddedImages(
        embeddings=torch.cat(embs),
        labels=torch.cat(labels) if labels else None,
        indices=torch.cat(indices),
        num_failed=failed,
        seconds=time.perf_counter() - start,
    )


def zeroshot_logits(
    model: DualEncoder,
    images: EmbeddedImages,
    classnames: Sequence[str],
    templates: str | Sequence[str],
    *,
    allow_duplicates: bool = False,
) -> torch.Tensor:
    """(N, C) zero-shot logits of already-embedded images against the class names' prompt head."""
    if images.labels is None:
        raise ValueError("zero-shot evaluation needs a label column")
    head = build_classifier(model, classnames, templates, allow_duplicates=allow_duplicates)
    return model.logits(images.embeddings.to(model.device), head.to(model.device)).cpu()


def zeroshot_eval(
    model: DualEncoder,
    images: EmbeddedImages,
    classnames: Sequence[str],
    templates: str | Sequence[str],
    *,
    allow_duplicates: bool = False,
    logits: torch.Tensor | None = None,
) -> dict:
    """Zero-shot top-1/top-5/mean-per-class recall of already-embedded images.

    Args:
        allow_duplicates: repeated class names, already checked (and warned about) by the caller
            (:func:`clipcore.zeroshot.validate_classnames`); each index keeps its own head row.
        logits: :func:`zeroshot_logits` of the same arguments, when the caller has them already.
    """
    if logits is None:
        logits = zeroshot_logits(model, images, classnames, templates, allow_duplicates=allow_duplicates)
    out = classification_metrics(logits, images.labels)
    out.update(num_classes=len(classnames), num_templates=len(get_templates(templates)))
    return out


@dataclass
class EmbeddedCaptions:
    """The captions of a retrieval split whose image decoded, embedded by the model."""

    embeddings: torch.Tensor  # (M, D)
    rows: list[int]  # each caption's image, as a row of the EmbeddedImages
    caption_ids: list[int]  # each caption's index in the split's caption list


@torch.no_grad()
def embed_captions(model: DualEncoder, images: EmbeddedImages, texts: list[str], text_to_image: list[int],
                   batch_size: int = 256) -> EmbeddedCaptions:
    """Embed the captions of the images that decoded; captions of images that failed are dropped."""
    row_of = {int(r): i for i, r in enumerate(images.indices.tolist())}
    kept = [(c, row_of[i]) for c, i in enumerate(text_to_image) if i in row_of]
    if not kept:
        raise ValueError("no captions left to score (no caption column, or every image failed to decode)")
    ids, rows = [c for c, _ in kept], [r for _, r in kept]
    kept_texts = [texts[c] for c in ids]
    emb = torch.cat(
        [model.encode_text(kept_texts[i : i + batch_size]).cpu() for i in range(0, len(kept_texts), batch_size)]
    )
    return EmbeddedCaptions(embeddings=emb, rows=rows, caption_ids=ids)


def retrieval_eval(model: DualEncoder, images: EmbeddedImages, texts: list[str], text_to_image: list[int],
                   batch_size: int = 256, captions: EmbeddedCaptions | None = None) -> dict:
    """Recall@1/5/10 in both directions; captions of images that failed to decode are dropped.
    ``captions``: :func:`embed_captions` of the same arguments, when the caller has them already."""
    if captions is None:
        captions = embed_captions(model, images, texts, text_to_image, batch_size)
    out = retrieval_metrics(images.embeddings, captions.embeddings, captions.rows)
    out.update(num_images=int(images.embeddings.shape[0]), num_texts=len(captions.rows))
    return out


def _spec(args: argparse.Namespace, split: str, limit: int | None) -> DataSpec:
    return DataSpec(
        path=args.data,
        split=split,
        image_column=args.image_column,
        label_column=args.label_column,
        caption_column=args.caption_column,
        limit=limit,
        shuffle_seed=args.seed if args.shuffle else None,
    )


def _embed_split(model: DualEncoder, spec: DataSpec, args: argparse.Namespace):
    ds = load_hf_dataset(spec)
    cols = resolve_columns(ds, spec)
    return ds, cols, _embed(model, ds, cols, spec, args)


def _embed(model: DualEncoder, ds, cols, spec: DataSpec, args: argparse.Namespace) -> EmbeddedImages:
    dataset = ImageDataset(ds, {"model": model.image_transform}, columns=cols)
    loader = make_loader(dataset, batch_size=args.batch_size, num_workers=args.num_workers)
    images = embed_images(model, loader, desc=f"{spec.split}", progress=not args.no_progress)
    if images.num_failed:
        log.warning("skipped %d images of %s[%s] that failed to decode", images.num_failed, spec.path, spec.split)
    return images


def _zeroshot_names(args: argparse.Namespace, ds, cols, templates: Sequence[str]) -> list[str]:
    """Class names checked with the templates and every label, before any image is embedded."""
    if not cols.label:
        raise ValueError(f"{args.data}[{args.split}]: zero-shot needs a label column (columns: {ds.column_names})")
    names = classnames_for(ds, cols.label, args.classnames)
    if names is None:
        raise ValueError(f"{args.data}: label column {cols.label!r} is not a ClassLabel; pass --classnames")
    # an evaluation, not a head that ships: standard lists (ImageNet-1k's) repeat names; one warning
    names, _ = validate_zeroshot_inputs(names, templates, ds[cols.label], allow_duplicates=True,
                                        source=f"{args.data}[{args.split}] column {cols.label!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m distill.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="hub id or local directory of a CLIP-family model")
    p.add_argument("--random-init", action="store_true", help="build the architecture from its config with random weights")
    p.add_argument("--data", required=True, help="hub id, parquet directory or imagefolder directory")
    p.add_argument("--split", default="test")
    p.add_argument("--task", nargs="+", choices=TASKS, default=None,
                   help="default: zeroshot when labels exist, retrieval when captions exist")
    p.add_argument("--templates", default="openai_cifar",
                   help="simple | openai_cifar | openai_imagenet | a '{}' template | a JSON file: a list, or "
                        "CLIP_benchmark's map dataset -> templates (FILE.json#NAME, default NAME: the --data name)")
    p.add_argument("--classnames", default=None, help="JSON list, JSON map label->synonyms, or comma-separated names")
    p.add_argument("--image-column", default=None)
    p.add_argument("--label-column", default=None)
    p.add_argument("--caption-column", default=None)
    p.add_argument("--limit", type=int, default=None, help="evaluate at most N images")
    p.add_argument("--shuffle", action="store_true", help="with --limit: a seeded random subset instead of the first N")
    p.add_argument("--train-split", default="train", help="linear probe: split to fit on")
    p.add_argument("--train-limit", type=int, default=None, help="linear probe: at most N training images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="write the JSON report here (default: print only)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error (also: CLIP_DISTILL_DEBUG=1)")
    return p


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """Numeric flags in range, before any model loads."""
    for flag, minimum in (("batch_size", 1), ("limit", 1), ("train_limit", 1), ("num_workers", 0)):
        value = getattr(args, flag)
        if value is not None and value < minimum:
            raise ValueError(f"--{flag.replace('_', '-')} {value}: expected an integer >= {minimum}")
    problem = args.output and output_path_problem(args.output, "file")
    if problem:  # the report is written after every task ran
        raise ValueError(f"--output {args.output}: {problem}")
    return args


def evaluate(args: argparse.Namespace) -> dict:
    """Run the requested tasks and return the JSON-serialisable report."""
    torch.manual_seed(args.seed)
    templates = load_templates(args.templates, dataset=args.data)  # a bad file fails before any image is embedded
    model = load_model(args.model, random_init=args.random_init, device=args.device)
    spec = _spec(args, args.split, args.limit)
    ds = load_hf_dataset(spec)
    cols = resolve_columns(ds, spec)
    tasks = args.task or [t for t, ok in (("zeroshot", cols.label), ("retrieval", cols.captions)) if ok]
    if not tasks:
        raise ValueError(f"{args.data}: no label or caption column found; pass --task and the column flags")
    names = _zeroshot_names(args, ds, cols, templates) if "zeroshot" in tasks else None
    images = _embed(model, ds, cols, spec, args)
    report: dict = {
        "format_version": FORMAT_VERSION,
        "model": args.model,
        "model_fingerprint": model.fingerprint(),
        "random_init": bool(args.random_init),
        "data": args.data,
        "split": args.split,
        "num_images": int(images.embeddings.shape[0]),
        "num_failed_images": images.num_failed,
    }
    if names is not None:
        report["zeroshot"] = zeroshot_eval(model, images, names, templates, allow_duplicates=True)
        report["zeroshot"]["templates"] = args.templates
    if "retrieval" in tasks:
        if not cols.captions:
            raise ValueError(f"{args.data}[{args.split}]: retrieval needs a caption column (columns: {ds.column_names})")
        texts, t2i = flatten_captions(ds, cols.captions)
        report["retrieval"] = retrieval_eval(model, images, texts, t2i)
    if "linear-probe" in tasks:
        report["linear_probe"] = _linear_probe(model, args, images)
    report["runtime"] = {
        "device": str(args.device),
        "embed_seconds": round(images.seconds, 3),
        "images_per_second": round(images.embeddings.shape[0] / max(images.seconds, 1e-9), 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    return report


def _linear_probe(model: DualEncoder, args: argparse.Namespace, test: EmbeddedImages) -> dict:
    if test.labels is None:
        raise ValueError("the linear probe needs a label column")
    _, _, train = _embed_split(model, _spec(args, args.train_split, args.train_limit), args)
    if train.labels is None:
        raise ValueError(f"split {args.train_split} has no labels for the linear probe")
    result = linear_probe(
        train.embeddings.numpy(), train.labels.numpy(), test.embeddings.numpy(), test.labels.numpy(), seed=args.seed
    )
    out = result.to_dict()
    out["train_split"] = args.train_split
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    # our loggers at INFO; libraries (onnxruntime's quantizer logs every tensor at INFO) at WARNING
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("clipcore", "distill", "exports", "students"):
        logging.getLogger(name).setLevel(logging.INFO)
    args = check_args(build_parser().parse_args(argv))
    report = evaluate(args)
    text = json.dumps(report, indent=2)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
        log.info("wrote %s", args.output)
    print(text)
    return report


def cli(argv: Sequence[str] | None = None) -> int:
    """``python -m distill.evaluate``: exit 0 done, 2 bad input (a non-finite model included), 1 otherwise."""
    return run_cli(lambda: main(argv), debug_requested(argv))


if __name__ == "__main__":
    sys.exit(cli())
