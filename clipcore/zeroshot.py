"""Zero-shot classifier heads: class names x prompt templates -> normalised class embeddings."""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clipcore.dual_encoder import DualEncoder
from clipcore.templates import get_templates

log = logging.getLogger(__name__)


def duplicate_classnames(classnames: Sequence[str]) -> dict[str, list[int]]:
    """Each class name that occurs more than once, case and spacing ignored, with its positions."""
    positions: dict[str, list[int]] = {}
    for i, c in enumerate(classnames):
        positions.setdefault(" ".join(str(c).lower().split()), []).append(i)
    return {k: v for k, v in positions.items() if len(v) > 1}


def _nonblank(classnames: Sequence[str]) -> list[str]:
    names = [str(c) for c in classnames]
    if not names:
        raise ValueError("the class-name list is empty: zero-shot classification needs at least one class")
    blank = [i for i, c in enumerate(names) if not c.strip()]
    if blank:
        raise ValueError(f"class names at positions {blank} are empty strings")
    return names


def validate_classnames(classnames: Sequence[str], *, allow_duplicates: bool = False, source: str = "") -> list[str]:
    """Non-empty, non-blank, distinct class names.

    Names that differ only in case or spacing count as duplicates: the tokenizers lower-case, so
    they give identical prompts, and two identical classes split every vote between them.

    Args:
        allow_duplicates: the evaluation policy. Standard lists repeat names (CLIP_benchmark's and
            OpenAI's ImageNet-1k: "missile" at 657 and 744, "sunglasses" at 836 and 837) and their
            published scores keep one head row per index, so evaluation (``distill.evaluate``, the
            benchmark suites) accepts them with one warning naming them. A head that ships (parity,
            bundles, training) keeps the default and refuses them.
        source: what the names are for (a dataset, a suite entry), to start the warning with.
    """
    names = _nonblank(classnames)
    dups = duplicate_classnames(names)
    if dups and not allow_duplicates:
        shown = "; ".join(f"{k!r} at positions {v}" for k, v in list(dups.items())[:5])
        raise ValueError(f"duplicate class names (case and spacing ignored): {shown}; every class needs its own name")
    if dups:
        shown = "; ".join(f"{k!r} at indices {v}" for k, v in dups.items())
        log.warning("%sduplicate class names (case and spacing ignored): %s; scored as given, each index with its own "
                    "head row (as CLIP_benchmark scores them): identical names give identical rows, which the model "
                    "cannot tell apart", f"{source}: " if source else "", shown)
    return names


def validate_labels(labels: Sequence[int] | np.ndarray, num_classes: int, source: str = "labels") -> None:
    """Integer labels in ``[0, num_classes)``: a label past the class-name list would be scored
    against the wrong classes (or none)."""
    arr = np.asarray(labels)
    if arr.size == 0:
        return
    if arr.dtype.kind == "f" and np.isfinite(arr).all() and (arr == np.round(arr)).all():
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{source}: labels must be integer class indices, got dtype {arr.dtype}")
    bad = arr[(arr < 0) | (arr >= num_classes)]
    if bad.size:
        worst = int(bad.min()) if bad.min() < 0 else int(bad.max())
        raise ValueError(f"{source}: label {worst} is outside [0, {num_classes}) for {num_classes} class names "
                         f"({bad.size} labels out of range); pass one class name per label value")


def validate_zeroshot_inputs(
    classnames: Sequence[str], templates: str | Sequence[str], labels: Sequence[int] | np.ndarray | None = None,
    source: str = "labels", *, allow_duplicates: bool = False,
) -> tuple[list[str], tuple[str, ...]]:
    """The one check of everything a zero-shot head and its scores depend on, run before any image
    is embedded: distinct class names, templates with exactly one ``{}``, labels within the names.

    Args:
        allow_duplicates: evaluation only: warn once about repeated names instead of refusing
            them (see :func:`validate_classnames`).

    Returns:
        the class names and the resolved templates.

    Raises:
        ValueError: naming the duplicate names, the bad template or the first out-of-range label.
    """
    names = validate_classnames(classnames, allow_duplicates=allow_duplicates, source=source)
    temps = get_templates(templates)
    if labels is not None:
        validate_labels(labels, len(names), source)
    return names, temps


@torch.no_grad()
def build_classifier(
    model: DualEncoder,
    classnames: Sequence[str],
    templates: str | Sequence[str] = "simple",
    batch_size: int = 256,
    *,
    allow_duplicates: bool = False,
) -> torch.Tensor:
    """The OpenAI / CLIP_benchmark recipe: for each class, encode every prompt, normalise each
    embedding, average them and renormalise.

    Args:
        allow_duplicates: an evaluation head whose names the caller has already checked with
            ``validate_classnames(..., allow_duplicates=True)`` (which warned): repeated names get
            one row per index, without a second warning.

    Returns:
        float32 tensor of shape (num_classes, embed_dim) with unit-norm rows.
    """
    names = _nonblank(classnames) if allow_duplicates else validate_classnames(classnames)
    temps = get_templates(templates)
    prompts = [t.format(c) for c in names for t in temps]
    chunks = [model.encode_text(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
    emb = torch.cat(chunks).float().view(len(names), len(temps), -1)
    return F.normalize(F.normalize(emb, dim=-1).mean(dim=1), dim=-1)


def zeroshot_logits(
    model: DualEncoder, image_emb: torch.Tensor, classifier: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Class logits ``logit_scale * image_emb @ classifier.T / T``."""
    return model.logits(image_emb, classifier.to(image_emb.device, image_emb.dtype), temperature)
