"""How tightly a student's image embeddings gather around their mean, and what centring them does.

    python benchmarks/embedding_spread.py --student outputs/general/final

A student that cannot see what decides the teacher's embedding (a 64 px photo) learns the
teacher's expected embedding, which lies nearer the mean of all embeddings than any one of the
teacher's: its embeddings gather more tightly around the mean. Image->text retrieval ranks captions
by (image . caption); the image's share along the mean then adds the same caption-specific bias
(mean . caption) to every image's ranking, so the same few captions rank high for every image.
Text->image ranks images for one caption, where that bias is a constant and drops out.

This prints, for the teacher and the student, the mean resultant length |mean of unit embeddings|
of training images (``--mean-data``, seeded subsets) and of the validation photos, then each suite
entry's score with every embedding centred, e -> normalise(e - gamma * m), m the model's own mean of
those training images, for each ``--gammas`` value, and (``--shares``) with every embedding given
the same share a along m's direction (a * m/|m| + sqrt(1 - a^2) * the unit residual), each with the
paired difference to the first row (gamma 0: the model as it is) and its 95 % interval, and the mean
cosine to the teacher's unchanged embedding. The suite
defaults to the validation splits (suites/validation.yaml): a diagnosis, never read on a test set.
"""

from __future__ import annotations

import argparse
import time
from typing import Sequence

import torch
import torch.nn.functional as F

from clipcore.bootstrap import difference_interval
from distill.benchmark import evaluate_entry, retrieval_query_hits, score_of, zeroshot_hits
from distill.evaluate import EmbeddedImages, embed_captions, retrieval_eval, zeroshot_eval, zeroshot_logits
from distill.mean_share import embed_source
from distill.suite import load_suite, prepare_suite
from students import load_model
from students.image_only import with_mean_share

MEAN_DATA = ("../shared/data/scene-photos:train", "../shared/data/tiny-imagenet:train")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", required=True, help="a saved image student (its text side is the teacher's)")
    p.add_argument("--teacher", default="outputs/reference-zeroshot/final")
    p.add_argument("--suite", default="suites/validation.yaml")
    p.add_argument("--mean-data", action="append", help=f"PATH:SPLIT of training images for the mean "
                                                         f"(repeatable; default {', '.join(MEAN_DATA)})")
    p.add_argument("--mean-limit", type=int, default=1000, help="images per --mean-data source (seeded)")
    p.add_argument("--gammas", default="0,0.25,0.5,0.75,1", help="centring strengths (0: the model as it is)")
    p.add_argument("--shares", default="", help="fixed shares along the mean direction to try (comma list)")
    p.add_argument("--batch-size", type=int, default=64)
    return p.parse_args(argv)


def centred(embeddings: torch.Tensor, mean: torch.Tensor, gamma: float) -> torch.Tensor:
    """Unit embeddings moved away from ``mean``: normalise(e - gamma * mean)."""
    return F.normalize(embeddings.float() - gamma * mean.float(), dim=-1)


def fixed_share(embeddings: torch.Tensor, mean: torch.Tensor, share: float) -> torch.Tensor:
    """Every embedding given the same component ``share`` along the mean direction (what
    ``python -m distill.mean_share`` gives a student, with the teacher's mean and share)."""
    return with_mean_share(embeddings, mean, share)


def mean_resultant_length(embeddings: torch.Tensor) -> float:
    """|mean of the unit embeddings|: 0 spread evenly over the sphere, 1 all the same."""
    return float(F.normalize(embeddings.float(), dim=-1).mean(0).norm())


def score(model, prepared, images: EmbeddedImages, captions=None):
    """The entry's score and per-query hits for already-embedded (possibly centred) images."""
    e = prepared.entry
    if e.task == "zeroshot":
        logits = zeroshot_logits(model, images, prepared.classnames, prepared.templates, allow_duplicates=True)
        metrics = zeroshot_eval(model, images, prepared.classnames, prepared.templates, logits=logits)
        return score_of(metrics, e.metric), zeroshot_hits(e.metric, logits, images)
    metrics = retrieval_eval(model, images, prepared.texts, prepared.text_to_image, captions=captions)
    return score_of(metrics, e.metric), retrieval_query_hits(e.metric, images, captions)


def with_embeddings(images: EmbeddedImages, embeddings: torch.Tensor) -> EmbeddedImages:
    return EmbeddedImages(embeddings, images.labels, images.indices, images.num_failed, images.seconds)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    start = time.perf_counter()
    gammas = [float(g) for g in args.gammas.split(",") if g.strip()]
    shares = [float(a) for a in args.shares.split(",") if a.strip()]
    prepared = prepare_suite(load_suite(args.suite))
    teacher = load_model(args.teacher).eval()
    models = {"teacher": teacher, "student": load_model(args.student, teacher=teacher).eval()}
    sources = args.mean_data or list(MEAN_DATA)
    means, rows, embedded = {}, [], {}
    for role, model in models.items():
        train = torch.cat([embed_source(model, s, args.mean_limit, args.batch_size) for s in sources])
        means[role] = train.mean(0)
        print(f"{role}: mean resultant length {mean_resultant_length(train):.3f} over {len(train)} training images "
              f"({', '.join(sources)})", flush=True)
        for p in prepared:
            _, images, _ = evaluate_entry(model, p, batch_size=args.batch_size, num_workers=0, progress=False)
            embedded[role, p.entry.name] = images
            print(f"{role}: mean resultant length {mean_resultant_length(images.embeddings):.3f} on "
                  f"{p.entry.name} ({len(images.embeddings)} images)", flush=True)
    transforms = [("centre", g, centred) for g in gammas] + [("share", a, fixed_share) for a in shares]
    print("\n| model | transform | " + " | ".join(f"{p.entry.name} {p.entry.metric} (paired vs the first) [95 %]"
                                                 for p in prepared) + " | cosine to the teacher, per entry |")
    print("|---|---|" + "---|" * len(prepared) + "---|")
    for role, model in models.items():
        base, captions = {}, {}
        for kind, value_of, transform in transforms:
            cells, cosines, row = [], [], {"model": role, "transform": kind, "value": value_of}
            for p in prepared:
                images = embedded[role, p.entry.name]
                moved = with_embeddings(images, transform(images.embeddings, means[role], value_of))
                if p.entry.task != "zeroshot" and p.entry.name not in captions:  # texts do not move with the images
                    captions[p.entry.name] = embed_captions(model, moved, p.texts, p.text_to_image)
                value, hits = score(model, p, moved, captions.get(p.entry.name))
                first_value, first_hits = base.setdefault(p.entry.name, (value, hits))
                lo, hi = difference_interval(p.entry.name, hits, first_hits)
                cos = float(F.cosine_similarity(moved.embeddings, embedded["teacher", p.entry.name].embeddings).mean())
                cells.append(f"{100 * value:.1f} % ({100 * (value - first_value):+.1f}) [{100 * lo:+.1f}, {100 * hi:+.1f}]")
                cosines.append(f"{cos:.3f}")
                row[p.entry.name] = {"score": value, "difference": value - first_value, "interval": [lo, hi],
                                     "cosine": cos}
            rows.append(row)
            print(f"| {role} | {kind} {value_of:g} | " + " | ".join(cells) + " | " + " / ".join(cosines) + " |",
                  flush=True)
    print(f"\n{time.perf_counter() - start:.0f} s")
    return rows


if __name__ == "__main__":
    main()
