"""Zero-shot classification and retrieval metrics on embeddings (pure tensor functions)."""

from __future__ import annotations

from typing import Sequence

import torch


class NonFiniteError(ValueError):
    """A metric's input holds NaN or inf: the model's outputs are not finite (diverged or damaged weights)."""


def require_finite(name: str, values) -> None:
    """Refuse NaN/inf inputs: a metric computed from them would be a plausible-looking number."""
    values = torch.as_tensor(values)
    if values.is_floating_point():
        bad = int((~torch.isfinite(values)).sum())
        if bad:
            raise NonFiniteError(f"{name}: {bad} of {values.numel()} values are NaN or inf; the model's outputs are "
                                 "not finite (diverged or damaged weights?), so no metric is computed")


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) bool: whether each row's label is among its ``k`` highest logits (k capped at #classes)."""
    require_finite("logits", logits)
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return (top == labels.to(top.device).view(-1, 1)).any(dim=1)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows whose label is among the ``k`` highest logits (k capped at #classes)."""
    return topk_hits(logits, labels, k).float().mean().item()


def mean_per_class_recall(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Average over classes present in ``labels`` of the per-class recall (balanced accuracy)."""
    recalls = []
    for c in range(num_classes):
        mask = labels == c
        if mask.any():
            recalls.append((pred[mask] == c).float().mean().item())
    return float(sum(recalls) / len(recalls)) if recalls else 0.0


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """top-1, top-5 and mean per-class recall from (N, C) logits and (N,) integer labels."""
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} logit rows but {labels.shape[0]} labels")
    if logits.shape[0] == 0:
        raise ValueError("no images to score (all failed to decode, or the split is empty)")
    require_finite("logits", logits)
    labels = labels.to(logits.device).long()
    return {
        "top1": topk_accuracy(logits, labels, 1),
        "top5": topk_accuracy(logits, labels, 5),
        "mean_per_class_recall": mean_per_class_recall(logits.argmax(dim=1), labels, logits.shape[1]),
    }


def retrieval_hits(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: Sequence[int] | torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> tuple[torch.Tensor, dict[str, dict[str, torch.Tensor]]]:
    """Per-query hits of :func:`retrieval_metrics`: ``(rows, hits)``, where ``rows`` are the image rows
    with at least one caption (the image->text queries, in order) and ``hits[direction]["R@K"]`` is a
    bool tensor per query (image->text: one per row of ``rows``; text->image: one per caption)."""
    require_finite("image embeddings", image_emb)
    require_finite("text embeddings", text_emb)
    t2i = torch.as_tensor(text_to_image, dtype=torch.long, device=image_emb.device)
    if text_emb.shape[0] != t2i.shape[0]:
        raise ValueError(f"{text_emb.shape[0]} captions but {t2i.shape[0]} caption->image indices")
    if image_emb.shape[-1] != text_emb.shape[-1]:
        raise ValueError(f"embedding sizes differ: images {image_emb.shape[-1]}, texts {text_emb.shape[-1]}")
    sim = image_emb.float() @ text_emb.float().t()  # (N, M)
    n_img = image_emb.shape[0]
    # positives[i, j] is True when caption j belongs to image i
    positives = torch.zeros(n_img, text_emb.shape[0], dtype=torch.bool, device=sim.device)
    positives[t2i, torch.arange(t2i.shape[0], device=sim.device)] = True
    has_text = positives.any(dim=1)
    hits: dict[str, dict[str, torch.Tensor]] = {"image_to_text": {}, "text_to_image": {}}
    for k in ks:
        top_t = sim.topk(min(k, sim.shape[1]), dim=1).indices
        hits["image_to_text"][f"R@{k}"] = positives.gather(1, top_t).any(dim=1)[has_text]
        top_i = sim.t().topk(min(k, n_img), dim=1).indices
        hits["text_to_image"][f"R@{k}"] = (top_i == t2i.view(-1, 1)).any(dim=1)
    return has_text.nonzero().flatten(), hits


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: Sequence[int] | torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, dict[str, float]]:
    """Image->text and text->image recall@K with several captions per image.

    An image->text query is a hit when ANY of the image's captions ranks in the top K
    (images with no caption are left out); a text->image query is a hit when its own
    image ranks in the top K.

    Args:
        image_emb: (N, D) normalised image embeddings.
        text_emb: (M, D) normalised caption embeddings.
        text_to_image: (M,) index of each caption's image.
    """
    _, hits = retrieval_hits(image_emb, text_emb, text_to_image, ks)
    return {direction: {name: h.float().mean().item() for name, h in per_k.items()} for direction, per_k in hits.items()}


def chance_score(metric: str, *, num_classes: int = 0, captions_per_image: Sequence[int] = ()) -> float:
    """The expected score of a model that ranks at random.

    Zero-shot: ``top1`` and ``mean_per_class_recall`` 1 / C, ``top5`` min(5, C) / C. Retrieval over
    N images and T captions (``captions_per_image[i]`` of them belong to image i): image->text R@K is
    the mean over images of 1 - C(T - m_i, K) / C(T, K) (at least one of its m_i captions among K
    random ones); text->image R@K is K / N.
    """
    if "_R@" in metric:
        direction, k = metric.split("_R@")
        k, n, t = int(k), len(captions_per_image), sum(captions_per_image)
        if n == 0 or t == 0:
            raise ValueError(f"{metric}: chance needs at least one image with captions")
        if direction == "text_to_image":
            return min(k, n) / n
        return sum(1.0 - _miss_all(t, m, k) for m in captions_per_image) / n
    if num_classes < 1:
        raise ValueError(f"{metric}: chance needs the number of classes, got {num_classes}")
    return min(5, num_classes) / num_classes if metric == "top5" else 1.0 / num_classes


def _miss_all(total: int, own: int, k: int) -> float:
    """P(none of ``own`` marked items among ``k`` drawn without replacement from ``total``)."""
    p = 1.0
    for i in range(min(k, total)):
        p *= max(0, total - own - i) / (total - i)
    return p
