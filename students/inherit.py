"""Weight inheritance: initialise a narrow-or-shallow CLIP ViT student from a CLIP ViT teacher.

Embeddings, final norms, projections and the logit scale are copied; of the encoder layers,
every k-th (k = teacher layers // student layers) is copied, aligned so that the student's last
layer is the teacher's last: the copied final norm and projection were trained on its output.
Only equal widths can be copied; the student may be shallower and may use another image size
(position embeddings are interpolated) or a shorter text context (truncated).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from clipcore.dual_encoder import DualEncoder, HFDualEncoder
from students.image_only import FrozenTextStudent

logger = logging.getLogger(__name__)

_CHECKED_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "patch_size")
_LAYER = re.compile(r"encoder\.layers\.(\d+)\.")


@dataclass
class InheritReport:
    """What :func:`inherit_from_teacher` did.

    Attributes:
        copied: student tensor names that now hold teacher values.
        adapted: copied names whose values were resized, with how.
        skipped: student tensor names left as they were, with why.
        layer_map: per tower, the teacher layer index copied into each student layer.
    """

    copied: list[str] = field(default_factory=list)
    adapted: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    layer_map: dict[str, list[int]] = field(default_factory=dict)

    @property
    def num_copied(self) -> int:
        return len(self.copied)

    def summary(self) -> str:
        layers = "; ".join(f"{tower} layers <- teacher {idx}" for tower, idx in self.layer_map.items())
        extra = f"; adapted {self.adapted}" if self.adapted else ""
        extra += f"; skipped {self.skipped}" if self.skipped else ""
        return f"copied {self.num_copied} tensors from the teacher ({layers}){extra}"


def pick_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher layer index for each student layer: every k-th, ending at the teacher's last.

    Raises:
        ValueError: the student is deeper than the teacher.
    """
    k = teacher_layers // student_layers
    if k == 0:
        raise ValueError(f"student has {student_layers} layers, more than the teacher's {teacher_layers}")
    return [teacher_layers - 1 - (student_layers - 1 - i) * k for i in range(student_layers)]


def _clip_model(model: DualEncoder, role: str) -> nn.Module:
    from transformers import CLIPModel

    if not (isinstance(model, HFDualEncoder) and isinstance(model.model, CLIPModel)):
        raise TypeError(f"init='teacher' needs a CLIP ViT {role} (HFDualEncoder around CLIPModel), got {model.name!r}")
    return model.model


def _pairs(student: DualEncoder, teacher: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """(name, student module, teacher module) for every part to copy; towers first."""
    from transformers import CLIPVisionModelWithProjection

    if isinstance(student, FrozenTextStudent):
        backbone = student.image_tower.backbone
        if not isinstance(backbone, CLIPVisionModelWithProjection):
            raise TypeError(
                f"init='teacher' needs a CLIP ViT student; {student.name} has a {type(backbone).__name__} "
                "image tower with no teacher counterpart"
            )
        return [("vision_model", backbone.vision_model, teacher.vision_model),
                ("visual_projection", backbone.visual_projection, teacher.visual_projection)]
    model = _clip_model(student, "student")
    return [(name, getattr(model, name), getattr(teacher, name))
            for name in ("vision_model", "text_model", "visual_projection", "text_projection")]


def _width_mismatches(pairs: list[tuple[str, nn.Module, nn.Module]]) -> list[str]:
    problems = []
    for name, dst, src in pairs:
        if not hasattr(dst, "config"):  # projections: compare shapes
            s_shape, t_shape = tuple(dst.weight.shape), tuple(src.weight.shape)
            if s_shape != t_shape:
                problems.append(f"{name} (out, in): student {s_shape} != teacher {t_shape}")
            continue
        for key in _CHECKED_FIELDS:
            s, t = getattr(dst.config, key, None), getattr(src.config, key, None)
            if s != t:
                problems.append(f"{name}.{key}: student {s} != teacher {t}")
    return problems


def _fit_positions(name: str, value: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, str | None]:
    """Teacher position embeddings resized to the student's count, and a note if they were."""
    if value.shape == shape:
        return value, None
    n, m = shape[0], value.shape[0]
    if name.startswith("text_model"):
        if n > m:
            raise ValueError(f"student text context {n} is longer than the teacher's {m}")
        return value[:n], f"truncated {m} -> {n} positions"  # causal: the first n positions are exact
    side_t, side_s = math.isqrt(m - 1), math.isqrt(n - 1)
    grid = value[1:].reshape(1, side_t, side_t, -1).permute(0, 3, 1, 2)
    # bicubic, as transformers' own CLIP interpolate_pos_encoding
    grid = F.interpolate(grid.float(), size=(side_s, side_s), mode="bicubic", align_corners=False).to(value.dtype)
    resized = torch.cat([value[:1], grid.permute(0, 2, 3, 1).reshape(n - 1, -1)])
    return resized, f"interpolated {side_t}x{side_t} -> {side_s}x{side_s} patch positions"


def _same_vocab(student: DualEncoder, teacher: DualEncoder) -> bool:
    s, t = getattr(student, "tokenizer", None), getattr(teacher, "tokenizer", None)
    return s is not None and t is not None and s.get_vocab() == t.get_vocab()


@torch.no_grad()
def _copy_part(name: str, dst: nn.Module, src: nn.Module, same_vocab: bool, report: InheritReport) -> None:
    layers = getattr(getattr(dst, "encoder", None), "layers", None)
    picks = pick_layers(len(src.encoder.layers), len(layers)) if layers is not None else []
    if picks:
        report.layer_map[name] = picks
    source = src.state_dict()
    for key, tensor in dst.state_dict().items():  # state_dict tensors share storage with the parameters
        full = f"{name}.{key}"
        if key.endswith("token_embedding.weight") and not same_vocab:
            report.skipped[full] = "student and teacher tokenizers have different vocabularies"
            continue
        value = source[_LAYER.sub(lambda m: f"encoder.layers.{picks[int(m.group(1))]}.", key, count=1)]
        if key.endswith("position_embedding.weight"):
            value, note = _fit_positions(full, value, tensor.shape)
            if note:
                report.adapted[full] = note
        tensor.copy_(value)
        report.copied.append(full)


def inherit_from_teacher(student: DualEncoder, teacher: DualEncoder) -> InheritReport:
    """Copy a CLIP ViT teacher's weights into a CLIP ViT student, in place.

    Args:
        student: a CLIP student (``HFDualEncoder`` around ``CLIPModel``) or a frozen-text student
            whose image tower is ``CLIPVisionModelWithProjection``.
        teacher: an ``HFDualEncoder`` around ``CLIPModel``.

    Returns:
        an :class:`InheritReport` (also logged at INFO).

    Raises:
        TypeError: either model is not a CLIP ViT.
        ValueError: widths (hidden, MLP, heads, patch, projection) differ, naming each, or the
            student is deeper than the teacher.
    """
    source = _clip_model(teacher, "teacher")
    pairs = _pairs(student, source)
    problems = _width_mismatches(pairs)
    if problems:
        raise ValueError(
            f"cannot inherit weights from teacher {teacher.name!r} into {student.name!r}, widths differ: "
            + "; ".join(problems)
        )
    report = InheritReport()
    same_vocab = _same_vocab(student, teacher)
    for name, dst, src in pairs:
        _copy_part(name, dst, src, same_vocab, report)
    with torch.no_grad():
        student.log_logit_scale.copy_(source.logit_scale)
    report.copied.append("logit_scale")
    logger.info("%s: %s", student.name, report.summary())
    return report
