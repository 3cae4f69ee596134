"""Zero-shot benchmark: several models on every dataset of a suite, with retention against a reference.

Usage:
    python -m distill.benchmark --model outputs/general/final --reference outputs/reference-zeroshot/final \\
        --suite suites/shared.yaml --out outputs/benchmark
    python -m distill.benchmark --model ../shared/data/clip-vit-base-patch32 --random-init \\
        --suite suites/shared.yaml --out outputs/benchmark-random --limit 256

Every dataset's class names, templates and captions are checked (:mod:`distill.suite`) before any
image is embedded. Each model (the reference first) embeds every dataset once, with its own
preprocessing, and is scored with :mod:`distill.evaluate`'s zero-shot and retrieval code. With
``--reference``, a model's retention on a dataset is its score divided by the reference's, measured
in the same run, and ``mean_retention`` averages those over the suite. Every score that is a mean
of per-query hits gets a 95 % bootstrap interval, its retention a paired one, and each model after
the first its paired difference to the first (:mod:`clipcore.bootstrap`): on a few hundred images a
few points are noise. Writes ``benchmark.json``, ``benchmark.md`` and a self-contained
``benchmark.html`` (the tables and one bar chart per dataset; :mod:`distill.benchmark_report`).
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
from collections import Counter
from typing import Sequence

import torch
import torch.nn.functional as F

from clipcore import bootstrap
from clipcore.augment import reduce_image
from clipcore.bootstrap import Hits
from clipcore.data import ImageDataset, make_loader
from clipcore.metrics import chance_score, retrieval_hits, topk_hits
from distill.benchmark_report import to_markdown, write_report
from distill.cli import output_path_problem
from distill.evaluate import (EmbeddedCaptions, EmbeddedImages, embed_captions, embed_images, retrieval_eval,
                              zeroshot_eval, zeroshot_logits)
from distill.suite import PreparedEntry, describe, load_suite, prepare_suite
from students import load_model

log = logging.getLogger("distill.benchmark")
FORMAT_VERSION = 1


def score_of(metrics: dict, metric: str) -> float:
    """The suite metric out of a zero-shot or retrieval result (``image_to_text_R@5`` -> nested)."""
    if "_R@" in metric:
        direction, k = metric.split("_R@")
        return float(metrics[direction][f"R@{k}"])
    return float(metrics[metric])


def zeroshot_hits(metric: str, logits: torch.Tensor, images: EmbeddedImages) -> Hits | None:
    """Per-image hits of a top-K metric, by dataset row; None for a metric that is not a mean of hits
    (``mean_per_class_recall`` weighs classes, not images)."""
    if metric not in ("top1", "top5"):
        return None
    return Hits(images.indices.long(), topk_hits(logits, images.labels, int(metric[-1])).cpu())


def retrieval_query_hits(metric: str, images: EmbeddedImages, captions: EmbeddedCaptions) -> Hits:
    """Per-query hits of an R@K metric: image->text by dataset row, text->image by caption index."""
    direction, k = metric.split("_R@")
    rows, hits = retrieval_hits(images.embeddings, captions.embeddings, captions.rows, ks=(int(k),))
    ids = images.indices[rows] if direction == "image_to_text" else torch.tensor(captions.caption_ids)
    return Hits(ids.long(), hits[direction][f"R@{k}"].cpu())


def evaluate_entry(model, prepared: PreparedEntry, *, batch_size: int, num_workers: int, progress: bool,
                   view=None) -> tuple[dict, EmbeddedImages, Hits | None]:
    """Embed one dataset with ``model`` (each image through ``view`` first, when given) and score it
    on the entry's task; the embeddings come back too, for the cosine to the reference's, and the
    per-query hits of the entry's metric, for its confidence interval."""
    e = prepared.entry
    dataset = ImageDataset(prepared.ds, {"model": model.image_transform}, prepared.columns, name=e.name, view=view)
    images = embed_images(model, make_loader(dataset, batch_size, num_workers=num_workers), desc=e.name,
                          progress=progress)
    if e.task == "zeroshot":
        # repeated names were accepted, with their one warning, when the suite was prepared
        logits = zeroshot_logits(model, images, prepared.classnames, prepared.templates, allow_duplicates=True)
        metrics = zeroshot_eval(model, images, prepared.classnames, prepared.templates, logits=logits)
        hits = zeroshot_hits(e.metric, logits, images)
    else:
        captions = embed_captions(model, images, prepared.texts, prepared.text_to_image)
        metrics = retrieval_eval(model, images, prepared.texts, prepared.text_to_image, captions=captions)
        hits = retrieval_query_hits(e.metric, images, captions)
    return {"score": score_of(metrics, e.metric), "metrics": metrics, "num_images": int(images.embeddings.shape[0]),
            "num_failed_images": images.num_failed, "embed_seconds": round(images.seconds, 2)}, images, hits


def cosine_to(images: EmbeddedImages, reference: EmbeddedImages | None) -> float | None:
    """Mean cosine between a model's and the reference's embedding of the same images (the quantity a
    student is distilled on); None without a reference or when the two live in spaces of other widths."""
    if reference is None or images.embeddings.shape[1] != reference.embeddings.shape[1]:
        return None
    row_of = {int(r): i for i, r in enumerate(reference.indices.tolist())}
    pairs = [(i, row_of[int(r)]) for i, r in enumerate(images.indices.tolist()) if int(r) in row_of]
    if not pairs:
        return None
    mine, theirs = (torch.tensor(x) for x in zip(*pairs))
    cos = F.cosine_similarity(images.embeddings[mine].float(), reference.embeddings[theirs].float(), dim=-1)
    return round(float(cos.mean()), 4)


def reduced_view(side: int):
    """The image reduced (bicubic, aspect kept) to a short side of ``side`` pixels and scaled back to its
    own size: what a student with a ``side``-pixel input could see of it."""
    return lambda image, _row: reduce_image(image, side)


def _cost(model) -> dict:
    from clipcore.flops import image_gflops, image_parameters

    try:
        return {"image_gflops": round(image_gflops(model), 4), "image_parameters": image_parameters(model)}
    except Exception as exc:  # a cost that cannot be counted must not lose the accuracies
        log.warning("could not count FLOPs/parameters: %s", exc)
        return {}


def run_model(path: str, role: str, prepared: list[PreparedEntry], args: argparse.Namespace,
              reference: dict[str, EmbeddedImages] | None = None,
              side: int | None = None) -> tuple[dict, dict[str, Hits | None]]:
    """One row of the report, and its per-query hits per dataset. ``side``: the ceiling row, the model
    on images reduced to that side. With ``reference`` (the reference row's embeddings per dataset),
    each result gains its mean cosine to them; a reference row fills ``reference`` instead."""
    random_init = bool(args.random_init) and role == "model"
    model = load_model(path, random_init=random_init, device=args.device)
    model.eval()
    row = {"model": path if side is None else f"{path} at {side} px", "role": role, "random_init": random_init,
           "fingerprint": model.fingerprint(), **_cost(model), "results": {}}
    hits: dict[str, Hits | None] = {}
    for p in prepared:
        log.info("%s on %s", row["model"], p.entry.name)
        result, images, hits[p.entry.name] = evaluate_entry(
            model, p, batch_size=args.batch_size, num_workers=args.num_workers, progress=not args.no_progress,
            view=reduced_view(side) if side else None)
        if role == "reference" and reference is not None:
            reference[p.entry.name] = images
        elif reference:
            result["cosine_to_reference"] = cosine_to(images, reference.get(p.entry.name))
        row["results"][p.entry.name] = result
    return row, hits


def chance_of(prepared: PreparedEntry) -> float:
    """The entry's metric for a model that ranks at random (:func:`clipcore.metrics.chance_score`)."""
    if prepared.entry.task == "zeroshot":
        return chance_score(prepared.entry.metric, num_classes=len(prepared.classnames or []))
    counts = Counter(prepared.text_to_image)
    return chance_score(prepared.entry.metric, captions_per_image=[counts[i] for i in range(len(prepared.ds))])


def add_retention(rows: list[dict], datasets: list[dict]) -> None:
    """Per row: ``retention[d] = score / reference score`` and ``above_chance_retention[d] = (score - chance) /
    (reference - chance)``, and their means over the datasets where the reference scores at least twice
    chance (``datasets[i]["in_mean"]``; those below are listed with the reason, never averaged: a reference
    near chance would make any ratio meaningless)."""
    ref = next((r for r in rows if r["role"] == "reference"), None)
    if ref is None:
        return
    for d in datasets:
        base = ref["results"][d["name"]]["score"]
        d["reference_score"] = base
        d["in_mean"] = base >= 2 * d["chance"] and base > 0
        if not d["in_mean"]:
            d["left_out"] = (f"the reference scores {100 * base:.1f} %, under twice chance "
                             f"({100 * 2 * d['chance']:.1f} %)")
    for row in rows:
        raw, above = {}, {}
        for d in datasets:
            score, base, chance = row["results"][d["name"]]["score"], d["reference_score"], d["chance"]
            raw[d["name"]] = score / base if base > 0 else None
            above[d["name"]] = (score - chance) / (base - chance) if base > chance else None
        row["retention"], row["above_chance_retention"] = raw, above
        kept = [d["name"] for d in datasets if d["in_mean"]]
        row["mean_retention"] = sum(raw[n] for n in kept) / len(kept) if kept else None
        row["mean_above_chance_retention"] = sum(above[n] for n in kept) / len(kept) if kept else None


def _rounded(interval: tuple[float, float] | None) -> list[float] | None:
    return None if interval is None else [round(interval[0], 4), round(interval[1], 4)]


def _retention_intervals(row: dict, row_hits: dict[str, Hits | None], ref_hits: dict[str, Hits | None],
                         datasets: list[dict]) -> None:
    samples = {d["name"]: None for d in datasets}
    for name, h in row_hits.items():
        if h is not None and ref_hits[name] is not None:
            samples[name] = bootstrap.ratio_samples(name, h, ref_hits[name])
    row["retention_interval"] = {n: _rounded(None if s is None else bootstrap.percentile_interval(s))
                                 for n, s in samples.items()}
    kept = [samples[d["name"]] for d in datasets if d.get("in_mean")]
    ok = kept and all(s is not None for s in kept)
    row["mean_retention_interval"] = _rounded(bootstrap.mean_interval(kept)) if ok else None


def add_intervals(rows: list[dict], hits: list[dict[str, Hits | None]], datasets: list[dict]) -> None:
    """95 % bootstrap intervals (:mod:`clipcore.bootstrap`): per result ``score_interval``; with a
    reference, per row ``retention_interval[d]`` (paired: the same resampled queries for the model and
    the reference) and ``mean_retention_interval`` over the datasets in the mean; per model row after the
    first ``difference_to_first_model[d]``, the paired interval of its score minus the first model's.
    None where the metric is not a mean of per-query hits or a resample leaves the reference at zero."""
    ref = next((i for i, r in enumerate(rows) if r["role"] == "reference"), None)
    first = next((i for i, r in enumerate(rows) if r["role"] == "model"), None)
    for i, (row, row_hits) in enumerate(zip(rows, hits)):
        for name, h in row_hits.items():
            row["results"][name]["score_interval"] = None if h is None else _rounded(bootstrap.score_interval(name, h))
        if row["role"] == "model" and i != first:
            row["difference_to_first_model"] = {
                name: None if h is None or hits[first][name] is None
                else _rounded(bootstrap.difference_interval(name, h, hits[first][name]))
                for name, h in row_hits.items()}
        if ref is not None:
            _retention_intervals(row, row_hits, hits[ref], datasets)


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    suite = load_suite(args.suite)
    prepared = prepare_suite(suite, args.limit)  # every dataset is checked before any model runs
    start = time.perf_counter()
    reference: dict[str, EmbeddedImages] = {}
    runs = [run_model(args.reference, "reference", prepared, args, reference)] if args.reference else []
    runs += [run_model(args.reference, "ceiling", prepared, args, reference, side) for side in args.ceiling_side]
    runs += [run_model(path, "model", prepared, args, reference) for path in args.model]
    rows, hits = [row for row, _ in runs], [h for _, h in runs]
    datasets = [{**describe(p), "chance": chance_of(p)} for p in prepared]
    add_retention(rows, datasets)
    add_intervals(rows, hits, datasets)
    return {
        "format_version": FORMAT_VERSION,
        "suite": str(args.suite),
        "reference": args.reference,
        "limit": args.limit,
        "datasets": datasets,
        "models": rows,
        "runtime": {"device": str(args.device), "seconds": round(time.perf_counter() - start, 1),
                    "python": platform.python_version(), "torch": torch.__version__},
    }


# ------------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m distill.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True,
                   help="a teacher or saved student directory, or hub id; repeat for several models")
    p.add_argument("--reference", default=None, help="the model retention is measured against (run first)")
    p.add_argument("--ceiling-side", type=int, action="append", default=[], metavar="PX",
                   help="also score the reference on every image reduced to a short side of PX pixels and scaled "
                        "back up: what a student with a PX-pixel input could reach (repeatable; needs --reference)")
    p.add_argument("--random-init", action="store_true",
                   help="build each --model (not the reference) with random weights")
    p.add_argument("--suite", required=True, help="YAML list of datasets, e.g. suites/shared.yaml")
    p.add_argument("--out", required=True, help="directory for benchmark.json / .md / .html")
    p.add_argument("--limit", type=int, default=None, help="at most N images per dataset (caps each entry's limit)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("distill", "students"):
        logging.getLogger(name).setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    problem = output_path_problem(args.out, "dir")
    if problem:  # the report is written after every model ran on every dataset
        raise ValueError(f"--out {args.out}: {problem}")
    if args.limit is not None and args.limit <= 0:
        raise ValueError(f"--limit must be a positive number of images, got {args.limit}")
    if args.ceiling_side and not args.reference:
        raise ValueError("--ceiling-side scores the reference on reduced images: give --reference too")
    if any(side < 1 for side in args.ceiling_side):
        raise ValueError(f"--ceiling-side must be a positive number of pixels, got {args.ceiling_side}")
    report = run(args)
    paths = write_report(report, args.out)
    print(to_markdown(report))
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return report


def cli(argv: Sequence[str] | None = None) -> int:
    """``python -m distill.benchmark`` and ``clip-distill benchmark``: exit 0 done, 2 bad input."""
    try:
        main(argv)
    except (ValueError, OSError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
