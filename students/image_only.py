"""Image-only students: a trainable image tower paired with the frozen teacher's text tower."""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clipcore.dual_encoder import DualEncoder, module_fingerprint
from clipcore.imaging import ImageTransform

CLIP_INIT_LOG_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature


def with_mean_share(embeddings: torch.Tensor, axis: torch.Tensor, share: float) -> torch.Tensor:
    """Unit embeddings given one and the same component ``share`` along ``axis``'s direction; what is left
    of each (its residual) keeps its direction and fills the rest of the unit length.

    The projection is a product and a sum, not a matrix product, so that a static int8 export (which
    quantises MatMul) leaves it in float.
    """
    axis = F.normalize(axis.to(embeddings.device, torch.float32), dim=0)
    e = embeddings.float()
    residual = F.normalize(e - (e * axis).sum(-1, keepdim=True) * axis, dim=-1)
    return share * axis + (1.0 - share * share) ** 0.5 * residual


class ImageTower(nn.Module):
    """A transformers vision backbone and a head mapping its pooled features to the embedding.

    ``family`` is the backbone's key in ``students.backbones.BACKBONES``, recorded when saving.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, family: str):
        super().__init__()
        # CNNs in channels_last: 1.6x faster training of resnet-cifar-m on 2 CPU cores (measured)
        self.channels_last = family != "clip_vision"
        self.backbone = backbone.to(memory_format=torch.channels_last) if self.channels_last else backbone
        self.head = head
        self.family = family

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Unnormalised embeddings, shape (B, D)."""
        if self.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        out = self.backbone(pixel_values=pixel_values)
        # CLIPVisionModelWithProjection already projects; CNNs give pooled maps ((B, C) or (B, C, 1, 1)).
        pooled = out.image_embeds if getattr(out, "image_embeds", None) is not None else out.pooler_output
        return self.head(pooled.flatten(1))


class FrozenTextStudent(DualEncoder):
    """Student image tower + the teacher's frozen text tower, in the teacher's embedding space.

    The teacher is held by reference outside the module tree, so it is not in ``parameters()``
    (an optimizer or DDP wrapper never sees it), not in ``state_dict()`` (checkpoints hold only
    the student) and not switched by ``train()``. It is left on whatever device its owner chose:
    token ids are moved to it and text features moved back.
    """

    def __init__(
        self,
        image_tower: ImageTower,
        image_transform: ImageTransform,
        *,
        embed_dim: int,
        name: str,
        teacher: DualEncoder | None = None,
        log_logit_scale: float = CLIP_INIT_LOG_SCALE,
    ):
        super().__init__()
        self.image_tower = image_tower
        self.image_transform = image_transform
        self.name = name
        # the student owns its temperature, as a CLIP student does: the distillation task trains it
        # and save/load carry it (state-dict key "log_scale", as when it was a buffer)
        self.log_scale = nn.Parameter(torch.tensor(float(log_logit_scale)))
        self._embed_dim = int(embed_dim)
        self.mean_share: float | None = None
        self.register_buffer("mean_axis", None, persistent=False)  # set_mean_share; saved in student.json
        self.__dict__["_teacher"] = None  # bypasses nn.Module.__setattr__, which would register it
        if teacher is not None:
            self.attach_teacher(teacher)

    @property
    def teacher(self) -> DualEncoder | None:
        return self.__dict__["_teacher"]

    def attach_teacher(self, teacher: DualEncoder) -> None:
        """Use ``teacher`` for text features and tokenisation.

        Raises:
            ValueError: its embedding size differs from the student's.
        """
        if teacher.embed_dim != self._embed_dim:
            raise ValueError(
                f"{self.name}: teacher {teacher.name!r} embeds into {teacher.embed_dim} dims, the student into "
                f"{self._embed_dim}; an image-only student must share the teacher's text embedding space"
            )
        self.__dict__["_teacher"] = teacher

    def _require_teacher(self) -> DualEncoder:
        if self.teacher is None:
            raise RuntimeError(
                f"{self.name} is an image-only student without a teacher: its text side is the teacher's. "
                "Pass teacher= to build_student/load_student or call attach_teacher()."
            )
        return self.teacher

    def __deepcopy__(self, memo: dict) -> "FrozenTextStudent":
        # copies (an EMA of the student, say) share the frozen teacher instead of cloning it
        if self.teacher is not None:
            memo.setdefault(id(self.teacher), self.teacher)
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            clone.__dict__[key] = copy.deepcopy(value, memo)
        return clone

    @property
    def has_own_text_tower(self) -> bool:
        return False

    @property
    def embed_dim(self) -> int:
        return self._embed_dim

    @property
    def log_logit_scale(self) -> torch.Tensor:
        return self.log_scale

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.image_tower(pixel_values)

    def set_mean_share(self, axis: torch.Tensor | None, share: float | None = None) -> None:
        """From now on give every image embedding the same ``share`` along ``axis`` (None: stop).

        A student that cannot see what decides the teacher's embedding learns its expectation, which
        lies nearer the mean of all embeddings than the teacher's own: its share along the mean varies
        more from image to image than its residual does, and image->text retrieval then ranks the same
        captions high for every image (docs/general-student.md). ``distill.mean_share`` sets ``axis``
        and ``share`` to the direction and length of the teacher's mean embedding.

        Raises:
            ValueError: ``axis`` is not a finite non-zero vector of the embedding size, or ``share`` is
                not in [0, 1).
        """
        if axis is None:
            self.mean_axis, self.mean_share = None, None
            return
        axis = torch.as_tensor(axis, dtype=torch.float32).detach().cpu()
        if axis.shape != (self._embed_dim,) or not torch.isfinite(axis).all() or float(axis.norm()) == 0.0:
            raise ValueError(f"{self.name}: mean_share axis must be a finite non-zero vector of {self._embed_dim} "
                             f"values, got shape {tuple(axis.shape)}")
        if share is None or not 0.0 <= float(share) < 1.0:
            raise ValueError(f"{self.name}: mean_share share={share!r}; expected a number in [0, 1)")
        device = next(self.parameters()).device
        self.mean_axis, self.mean_share = axis.to(device), float(share)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        emb = super().encode_image(pixel_values)
        return emb if self.mean_axis is None else with_mean_share(emb, self.mean_axis, self.mean_share)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        teacher = self._require_teacher()
        device = teacher.device
        mask = None if attention_mask is None else attention_mask.to(device)
        with torch.no_grad():  # the teacher text tower is frozen; no graph to keep
            feats = teacher.text_features(input_ids.to(device), mask)
        return feats.to(input_ids.device)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self._require_teacher().tokenize(texts)

    def fingerprint(self) -> str:
        """Hash of the student weights and transform, plus the teacher's (its text side is ours)."""
        teacher = "" if self.teacher is None else self.teacher.fingerprint()
        share = "" if self.mean_axis is None else f"{self.mean_share!r}{self.mean_axis.cpu().numpy().tobytes().hex()}"
        return module_fingerprint(self, extra=self.image_transform.to_json() + teacher + share)
