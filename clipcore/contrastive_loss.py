"""Losses of contrastive fine-tuning (``mode: contrastive``): no teacher, the model against itself.

:func:`multi_positive_clip_loss` is the CLIP loss whose positives are every pair of one group
(the captions made from one class's labels); :class:`SoftTargetKLLoss` matches a prediction to
soft targets (the image tower's own ImageNet classifier). Both follow :mod:`clipcore.losses`:
small modules returning dicts whose ``*_loss`` entries :func:`clipcore.losses.total_loss` sums.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipcore.dist import gather_with_grad, rank
from clipcore.losses import check_temperature, check_weight, logit_scale


def multi_positive_clip_loss(
    image: torch.Tensor, text: torch.Tensor, log_scale: torch.Tensor, groups: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric InfoNCE whose positives are every pair in the same group.

    With ``groups`` None this is the plain CLIP loss (row i's positive is text i). With groups
    (e.g. class labels of captions made from labels), row i's target is uniform over all texts of
    its group in the batch gathered from every process, so two images of one class never push each
    other's captions away as negatives.

    Args:
        image, text: (B, D) local embeddings (normalised here, in float32).
        log_scale: the learnable log logit scale (clamped to ln 100 on use).
        groups: optional (B,) integer group ids.
    """
    img, txt = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
    all_img, all_txt = gather_with_grad(img), gather_with_grad(txt, check_sizes=False)
    b = img.shape[0]
    own = torch.arange(b, device=img.device) + rank() * b
    if groups is None:
        targets = F.one_hot(own, all_txt.shape[0]).float()
    else:
        all_groups = gather_with_grad(groups.to(img.device), check_sizes=False)
        targets = (groups.to(img.device)[:, None] == all_groups[None]).float()
        targets = targets / targets.sum(dim=1, keepdim=True)
    scale = logit_scale(log_scale)
    loss_i = -(targets * F.log_softmax(scale * img @ all_txt.t(), dim=1)).sum(1).mean()
    loss_t = -(targets * F.log_softmax(scale * txt @ all_img.t(), dim=1)).sum(1).mean()
    return 0.5 * (loss_i + loss_t)


class MultiPositiveClipLoss(nn.Module):
    """:func:`multi_positive_clip_loss` as a loss module: ``{"clip_loss", "logit_scale"}``, or ``{}`` at weight 0."""

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = check_weight("clip weight", weight)

    def forward(self, image: torch.Tensor, text: torch.Tensor, log_scale: torch.Tensor,
                groups: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self.weight == 0:
            return {}
        return {"clip_loss": self.weight * multi_positive_clip_loss(image, text, log_scale, groups),
                "logit_scale": logit_scale(log_scale).detach()}


class SoftTargetKLLoss(nn.Module):
    """``KL(softmax(targets / T) || softmax(logits))``, batch mean, as ``{"<name>_loss"}``.

    Contrastive mode's ImageNet term: the zero-shot prediction over the 1000 class prompts is
    matched to the image tower's own ImageNet classifier, softened by ``temperature``.
    """

    def __init__(self, weight: float, temperature: float = 1.0, name: str = "soft_kl"):
        super().__init__()
        self.weight = check_weight(f"{name} weight", weight)
        self.temperature = check_temperature(f"{name} temperature", temperature)
        self.key = f"{name}_loss"

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.weight == 0:
            return {}
        target = F.softmax(targets.float() / self.temperature, dim=-1)
        kl = F.kl_div(F.log_softmax(logits.float(), dim=-1), target, reduction="batchmean")
        return {self.key: self.weight * kl}
