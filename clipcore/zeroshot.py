"""Zero-shot classifier heads: class names x prompt templates -> normalised class embeddings."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from clipcore.dual_encoder import DualEncoder
from clipcore.templates import get_templates


def validate_classnames(classnames: Sequence[str]) -> list[str]:
    names = [str(c) for c in classnames]
    if not names:
        raise ValueError("the class-name list is empty: zero-shot classification needs at least one class")
    blank = [i for i, c in enumerate(names) if not c.strip()]
    if blank:
        raise ValueError(f"class names at positions {blank} are empty strings")
    return names


@torch.no_grad()
def build_classifier(
    model: DualEncoder,
    classnames: Sequence[str],
    templates: str | Sequence[str] = "simple",
    batch_size: int = 256,
) -> torch.Tensor:
    """The OpenAI / CLIP_benchmark recipe: for each class, encode every prompt, normalise each
    embedding, average them and renormalise.

    Returns:
        float32 tensor of shape (num_classes, embed_dim) with unit-norm rows.
    """
    names = validate_classnames(classnames)
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
