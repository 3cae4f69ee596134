"""Losses of text-only distillation: a text student against the teacher's text embeddings.

Small modules returning dicts, as :mod:`clipcore.losses`: keys ending in ``_loss`` are weighted and
summed (:func:`clipcore.losses.total_loss`), the others are detached metrics; a weight of 0 returns
``{}`` at once. Inputs need not be normalised (each loss normalises in float32).

    student_text   (B, D)  the text student's embeddings
    teacher_text   (B, D)  the teacher's embeddings of the same texts (detached here)
    image_bank     (N, D)  fixed image embeddings of the teacher: the images the text will meet
    teacher_scale  ()      the teacher's multiplicative logit scale
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipcore.losses import _teacher_scale, check_temperature, check_weight, kl_distill


def _pair(student_text: torch.Tensor, teacher_text: torch.Tensor, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    if student_text.shape != teacher_text.shape or student_text.dim() != 2:
        raise ValueError(f"{loss}: student_text {tuple(student_text.shape)} and teacher_text "
                         f"{tuple(teacher_text.shape)} must both be (B, D)")
    return F.normalize(student_text.float(), dim=-1), F.normalize(teacher_text.detach().float(), dim=-1)


class TextFeatureLoss(nn.Module):
    """``1 - cos(student, teacher)`` per text, averaged: the student lands on the teacher's embedding."""

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = check_weight("text feature weight", weight)

    def forward(self, *, student_text: torch.Tensor, teacher_text: torch.Tensor, **_) -> dict[str, torch.Tensor]:
        if self.weight == 0:
            return {}
        s, t = _pair(student_text, teacher_text, "TextFeatureLoss")
        cos = (s * t).sum(-1)
        return {"text_feature_loss": self.weight * (1 - cos).mean(), "text_cosine": cos.mean().detach()}


class TextAffinityLoss(nn.Module):
    """``T^2 KL`` between the teacher's and the student's distributions over a bank of image embeddings.

    Each text is a classifier over the bank (``softmax(scale * text . images / T)``, the teacher's
    scale on both sides): matching it matches what the text does in zero-shot heads and retrieval,
    which the cosine alone weighs evenly in every direction, including those no image uses.
    """

    def __init__(self, weight: float = 1.0, temperature: float = 1.0):
        super().__init__()
        self.weight = check_weight("text affinity weight", weight)
        self.temperature = check_temperature("text affinity temperature", temperature)

    def forward(self, *, student_text: torch.Tensor, teacher_text: torch.Tensor, image_bank: torch.Tensor | None = None,
                teacher_scale=None, **_) -> dict[str, torch.Tensor]:
        if self.weight == 0:
            return {}
        if image_bank is None or teacher_scale is None:
            raise ValueError("TextAffinityLoss needs image_bank and teacher_scale")
        s, t = _pair(student_text, teacher_text, "TextAffinityLoss")
        if image_bank.dim() != 2 or image_bank.shape[1] != s.shape[1]:
            raise ValueError(f"TextAffinityLoss: image_bank {tuple(image_bank.shape)} is not (N, {s.shape[1]})")
        bank = F.normalize(image_bank.detach().float(), dim=-1)
        scale = _teacher_scale(teacher_scale, s.device)
        student_logits, teacher_logits = scale * s @ bank.t(), scale * t @ bank.t()
        agree = (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean()
        return {"text_affinity_loss": self.weight * kl_distill(student_logits, teacher_logits, self.temperature),
                "affinity_top1_agreement": agree.detach()}


class TextDistillLoss(nn.Module):
    """The two losses of a text student, one dict."""

    def __init__(self, feature_weight: float = 1.0, affinity_weight: float = 1.0, temperature: float = 1.0):
        super().__init__()
        self.feature = TextFeatureLoss(feature_weight)
        self.affinity = TextAffinityLoss(affinity_weight, temperature)

    def forward(self, **inputs) -> dict[str, torch.Tensor]:
        return {**self.feature(**inputs), **self.affinity(**inputs)}
