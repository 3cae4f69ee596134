"""Bootstrap confidence intervals for scores that are means of per-query hits.

A zero-shot top-1 or a retrieval R@K is the mean of one hit (0/1) per image or caption. On a few
hundred queries that mean moves by several points between two models that embed images almost
alike (500 scene photos with a reference at 11 % R@5: one image is 1.8 % of its score), so a
benchmark that picks settings on such a split must say how far its numbers can be trusted.

The resamples are drawn from a generator seeded by the dataset's name and size, so every model of a
run (and of another run on the same split) is resampled on the *same* queries: a retention (the
model's score over the reference's on each resample) is a paired interval, and two models' intervals
come from the same draws.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

RESAMPLES = 1000
LEVEL = 0.95


@dataclass(frozen=True)
class Hits:
    """One model's per-query hits on one dataset: ``ids`` name the queries (dataset rows or caption
    indices) so that two models are compared on the queries both scored."""

    ids: torch.Tensor  # (N,) int64
    hits: torch.Tensor  # (N,) bool

    def __post_init__(self) -> None:
        if self.ids.shape != self.hits.shape or self.ids.dim() != 1:
            raise ValueError(f"ids {tuple(self.ids.shape)} and hits {tuple(self.hits.shape)} must be two equal 1-d shapes")


def resample_indices(name: str, n: int, resamples: int = RESAMPLES) -> torch.Tensor:
    """(resamples, n) row indices drawn with replacement, the same for every call with ``name`` and ``n``."""
    if n < 1:
        raise ValueError(f"{name}: no queries to resample")
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}:{n}".encode()))
    return torch.randint(n, (resamples, n), generator=g)


def percentile_interval(values: torch.Tensor, level: float = LEVEL) -> tuple[float, float]:
    lo, hi = torch.quantile(values.double(), torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.double))
    return float(lo), float(hi)


def score_interval(name: str, hits: Hits, *, resamples: int = RESAMPLES, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of the mean hit rate over ``resamples`` bootstrap resamples of the queries."""
    order = hits.ids.argsort()  # resample by query id, so that models with the same queries draw the same ones
    values = hits.hits[order].double()
    idx = resample_indices(name, values.numel(), resamples)
    return percentile_interval(values[idx].mean(dim=1), level)


def paired(a: Hits, b: Hits) -> tuple[torch.Tensor, torch.Tensor]:
    """The hits of ``a`` and ``b`` on the queries both scored, in id order."""
    common = torch.tensor(sorted(set(a.ids.tolist()) & set(b.ids.tolist())), dtype=torch.long)
    if common.numel() == 0:
        raise ValueError("the two models scored no query in common")

    def take(h: Hits) -> torch.Tensor:
        pos = {int(i): p for p, i in enumerate(h.ids.tolist())}
        return h.hits[torch.tensor([pos[int(i)] for i in common])].double()

    return take(a), take(b)


def ratio_samples(name: str, model: Hits, reference: Hits, *, resamples: int = RESAMPLES) -> torch.Tensor | None:
    """(resamples,) the model's score over the reference's on the same resampled queries; None when a
    resample leaves the reference at zero (no ratio exists there)."""
    mine, ref = paired(model, reference)
    idx = resample_indices(name, mine.numel(), resamples)
    denominator = ref[idx].mean(dim=1)
    if bool((denominator == 0).any()):
        return None
    return mine[idx].mean(dim=1) / denominator


def ratio_interval(name: str, model: Hits, reference: Hits, *, resamples: int = RESAMPLES,
                   level: float = LEVEL) -> tuple[float, float] | None:
    """Paired percentile interval of ``model``'s score ÷ ``reference``'s (the retention)."""
    samples = ratio_samples(name, model, reference, resamples=resamples)
    return None if samples is None else percentile_interval(samples, level)


def difference_interval(name: str, model: Hits, other: Hits, *, resamples: int = RESAMPLES,
                        level: float = LEVEL) -> tuple[float, float]:
    """Paired percentile interval of ``model``'s score minus ``other``'s on the queries both scored: the
    test between two models (their own intervals overlap far more often than their paired difference
    straddles zero, because both models find the same easy and hard queries)."""
    mine, theirs = paired(model, other)
    idx = resample_indices(name, mine.numel(), resamples)
    return percentile_interval((mine - theirs)[idx].mean(dim=1), level)


def mean_interval(samples: list[torch.Tensor], *, level: float = LEVEL) -> tuple[float, float] | None:
    """Interval of the mean over datasets of per-dataset bootstrap samples (each dataset resampled on its own)."""
    if not samples:
        return None
    return percentile_interval(torch.stack(samples).mean(dim=0), level)

