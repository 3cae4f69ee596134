"""``loss.tower_weight``: the student's pooled image features against the teacher's frozen-tower features.

A teacher built on frozen towers (``configs/reference_*.yaml``) embeds an image as ``head(tower(x))``;
the training run caches ``tower(x)`` anyway (:func:`distill.features.cached_image_tower_features`).
:class:`TowerHint` is the trainable side of matching it: a linear adapter from the student's pooled
features (the input of its image head, read by a forward pre-hook, so the student runs once) to the
tower's width, and the per-dimension statistics that standardise the cached features. The loss itself
is :class:`clipcore.losses.TowerHintLoss`. The adapter is training-only: it is never saved with the
student or exported.
"""

from __future__ import annotations

import torch
from torch import nn

from clipcore.dual_encoder import DualEncoder


def student_image_head(student: DualEncoder) -> nn.Module:
    """The head of an image-only student (:class:`students.image_only.ImageTower`), or a ValueError."""
    head = getattr(getattr(student, "image_tower", None), "head", None)
    if not isinstance(head, nn.Module) or not any(isinstance(m, nn.Linear) for m in head.modules()):
        raise ValueError(f"loss.tower_weight reads the pooled features an image-only student's head takes; "
                         f"student {getattr(student, 'name', type(student).__name__)!r} has no such head")
    return head


class TowerHint(nn.Module):
    """Adapter + standardisation for the tower hint; ``forward(teacher_tower) -> (student, teacher)``,
    both ``(B, F)``, to be passed to the losses as ``student_tower`` / ``teacher_tower``.

    Args:
        student: an image-only student; a pre-hook on its image head keeps the head's input.
        teacher_towers: the cached ``(N, K, F)`` tower features the run trains on (their mean and std
            per dimension, over every row and view, standardise each batch's).
    """

    def __init__(self, student: DualEncoder, teacher_towers: torch.Tensor):
        super().__init__()
        head = student_image_head(student)
        pooled = next(m for m in head.modules() if isinstance(m, nn.Linear)).in_features
        flat = teacher_towers.reshape(-1, teacher_towers.shape[-1]).float()
        self.adapter = nn.Linear(pooled, flat.shape[1])
        self.register_buffer("mean", flat.mean(0), persistent=False)
        # dimensions that never vary (dead ReLU6 channels) standardise to 0, not to inf
        self.register_buffer("std", flat.std(0).clamp_min(1e-4), persistent=False)
        self._pooled: list[torch.Tensor | None] = [None]  # a list: not a registered buffer
        head.register_forward_pre_hook(self._keep)

    def _keep(self, module: nn.Module, args: tuple) -> None:
        # only while the task trains (its train() reaches this module): evaluation and export leave it
        if self.training:
            self._pooled[0] = args[0]

    def forward(self, teacher_tower: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, self._pooled[0] = self._pooled[0], None
        if pooled is None:
            raise RuntimeError("TowerHint: the student's image head has not run in training mode since the last "
                               "call; run the student on the batch first")
        if teacher_tower is None:
            raise ValueError("loss.tower_weight needs the batch's `teacher_tower` features (cached with the "
                             "teacher targets: cache.enabled=true)")
        return self.adapter(pooled.flatten(1)), (teacher_tower.float() - self.mean) / self.std
