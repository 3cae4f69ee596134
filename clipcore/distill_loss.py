"""The distillation objective: :class:`LossConfig` (the recipe's ``loss`` section) and
:class:`DistillLoss`, every term of :mod:`clipcore.losses` it switches on, in one module returning one dict."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn as nn

from clipcore.losses import (
    FEATURE_KINDS,
    CaptionBankKL,
    CaptionContrastiveLoss,
    ClipLoss,
    EmbeddingCache,
    FeatureDistillLoss,
    ImageAffinityKL,
    InteractiveContrastiveLoss,
    KLDistillLoss,
    TowerHintLoss,
    check_temperature,
    check_weight,
    logit_scale,
)

EMBEDDING_KEYS = (
    "student_image",
    "student_text",
    "teacher_image",
    "teacher_text",
    "student_image_proj",
    "student_text_proj",
    "student_class",
    "teacher_class",
    "student_log_scale",
    "teacher_scale",
    "student_tower",
    "teacher_tower",
    "caption_bank",
    "caption_candidates",
    "caption_targets",
    "caption_mask",
)


@dataclass
class LossConfig:
    """Weights of the distillation objective (the ``loss`` section of a training recipe).

    The one definition, with the one set of defaults and the one validation: a weight of 0
    switches its term off.

    kl_weight / kl_temperature: :class:`KLDistillLoss`; kl_on_classes / kl_on_affinity pick its logits.
    clip_weight: the student's own contrastive loss (:class:`ClipLoss`); needs image-text pairs.
    feature_weight / feature_kind ("cosine" | "mse"): :class:`FeatureDistillLoss`.
    interactive_weight: :class:`InteractiveContrastiveLoss`; needs image-text pairs.
    tower_weight: :class:`TowerHintLoss`, the student's pooled image features (through a learned adapter)
        against the teacher's cached frozen-tower features; needs a teacher built on frozen towers.
    caption_weight: :class:`CaptionBankKL`, the teacher's image->caption distribution over a bank of the training
        sources' captions (``data.train[i].caption_column``), ``caption_bank_size`` of them drawn each step, at
        ``kl_temperature``; needs data.train as a list of sources, one of them with a caption column.
    image_affinity_weight: :class:`ImageAffinityKL`, the teacher's image->image affinities within the batch (each
        student image against the teacher's embeddings of the batch's images) at ``kl_temperature``.
    caption_contrastive_weight: :class:`CaptionContrastiveLoss`, each captioned image ranked first against its own
        caption among ``caption_bank_size`` captions of other images (cross-entropy at the teacher's fixed logit scale:
        CLIP-KD's interactive loss with the captions as the pairs); needs a source with a ``caption_column``.
    """

    kl_weight: float = 1.0
    kl_temperature: float = 2.0
    kl_on_classes: bool = True
    kl_on_affinity: bool = True
    clip_weight: float = 0.0
    feature_weight: float = 1.0
    feature_kind: str = "cosine"
    interactive_weight: float = 0.0
    tower_weight: float = 0.0
    caption_weight: float = 0.0
    caption_bank_size: int = 4096
    image_affinity_weight: float = 0.0
    caption_contrastive_weight: float = 0.0

    def __post_init__(self):
        for f in ("kl_weight", "clip_weight", "feature_weight", "interactive_weight", "tower_weight", "caption_weight",
                  "image_affinity_weight", "caption_contrastive_weight"):
            check_weight(f, getattr(self, f))
        check_temperature("kl_temperature", self.kl_temperature)
        if self.feature_kind not in FEATURE_KINDS:
            raise ValueError(f"feature_kind must be one of {FEATURE_KINDS}, got {self.feature_kind!r}")
        for f in ("kl_on_classes", "kl_on_affinity"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"{f} must be true or false, got {getattr(self, f)!r}")
        if isinstance(self.caption_bank_size, bool) or not isinstance(self.caption_bank_size, int) \
                or self.caption_bank_size < 1:
            raise ValueError(f"caption_bank_size must be a positive number of captions, got {self.caption_bank_size!r}")
        if self.kl_weight > 0 and not (self.kl_on_classes or self.kl_on_affinity):
            raise ValueError("kl_on_classes and kl_on_affinity are both false while kl_weight > 0")
        if not any(getattr(self, f) > 0 for f in ("kl_weight", "clip_weight", "feature_weight", "interactive_weight")):
            # the tower hint alone would never train the student's embedding head
            raise ValueError("all loss weights (kl_weight, clip_weight, feature_weight, interactive_weight) are 0")

    @classmethod
    def from_dict(cls, d: Mapping) -> "LossConfig":
        """Build from a mapping (a YAML section); unknown keys raise ``ValueError`` naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown loss config field(s) {unknown}; known: {sorted(names)}")
        return cls(**d)


class DistillLoss(nn.Module):
    """All loss terms of :class:`LossConfig`; ``forward(**embeddings)`` returns one merged dict.

    Embedding keywords are those of this module's docstring (unknown keywords raise). One
    :class:`EmbeddingCache` is shared by the terms, so each tensor is gathered once per call. Sum the
    result with :func:`total_loss`. Holds no parameters: the logit scale and any projection belong to
    the trainable module.
    """

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.cfg = cfg
        self.clip = ClipLoss(cfg.clip_weight)
        self.kl = KLDistillLoss(cfg.kl_weight, cfg.kl_temperature, cfg.kl_on_classes, cfg.kl_on_affinity)
        self.feature = FeatureDistillLoss(cfg.feature_weight, cfg.feature_kind)
        self.interactive = InteractiveContrastiveLoss(cfg.interactive_weight)
        self.tower = TowerHintLoss(cfg.tower_weight)
        self.caption = CaptionBankKL(cfg.caption_weight, cfg.kl_temperature)
        self.image_affinity = ImageAffinityKL(cfg.image_affinity_weight, cfg.kl_temperature)
        self.caption_contrastive = CaptionContrastiveLoss(cfg.caption_contrastive_weight)

    def forward(self, **embeddings) -> dict[str, torch.Tensor]:
        unknown = sorted(set(embeddings) - set(EMBEDDING_KEYS))
        if unknown:
            raise ValueError(f"DistillLoss got unknown embedding keyword(s) {unknown}; known: {list(EMBEDDING_KEYS)}")
        cache = EmbeddingCache()
        out: dict[str, torch.Tensor] = {}
        for term in (self.clip, self.kl, self.feature, self.interactive, self.tower, self.caption,
                     self.image_affinity, self.caption_contrastive):
            out.update(term(**embeddings, cache=cache))
        if "logit_scale" not in out and embeddings.get("student_log_scale") is not None:
            out["logit_scale"] = logit_scale(embeddings["student_log_scale"]).detach()
        return out


def build_losses(cfg: LossConfig | Mapping) -> DistillLoss:
    """:class:`DistillLoss` from a :class:`LossConfig` or a plain mapping of its fields."""
    return DistillLoss(cfg if isinstance(cfg, LossConfig) else LossConfig.from_dict(cfg))


