"""One builder for every student: a named (or given) config, a teacher, and an initialisation."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from clipcore.dual_encoder import DualEncoder
from clipcore.imaging import ImageTransform
from students.backbones import backbone_config, build_image_tower
from students.clip_student import build_clip_student
from students.configs import ClipStudentConfig, ImageStudentConfig, StudentConfig, TextStudentConfig
from students.image_only import FrozenTextStudent
from students.inherit import inherit_from_teacher
from students.registry import get_student_config

TEACHER_INIT = "teacher"
HEADS = ("linear", "mlp", "teacher")
MLP_HIDDEN = 1024  # the tower teachers' default (clipcore.towers.TowerSpec.head_hidden)


def _resolve_embed_dim(embed_dim: int | None, teacher: DualEncoder | None) -> int:
    if embed_dim is not None:
        return int(embed_dim)
    if teacher is None:
        raise ValueError("pass embed_dim= or a teacher to take it from")
    return teacher.embed_dim


def _resolve_tokenizer(tokenizer, teacher: DualEncoder | None):
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer))
    if tokenizer is not None:
        return tokenizer
    if getattr(teacher, "tokenizer", None) is None:
        raise ValueError("a CLIP student needs a tokenizer: pass tokenizer= or a teacher that has one")
    return teacher.tokenizer


def build_frozen_text_student(
    cfg: ImageStudentConfig,
    *,
    embed_dim: int,
    transform: ImageTransform,
    teacher: DualEncoder | None = None,
    init: str | Path | None = None,
    head: str = "linear",
    head_hidden: int | None = None,
) -> FrozenTextStudent:
    """An image-only student from its config.

    Args:
        cfg: the architecture.
        embed_dim: the teacher's embedding size.
        transform: the student's image transform; its crop side is the backbone's image size.
        teacher: supplies text features and tokenisation; may be attached later.
        init: hub id or directory of pretrained backbone weights.
        head: one of :data:`HEADS` (see :func:`build_student`).
        head_hidden: the MLP head's hidden size (``head="mlp"`` only); None: :data:`MLP_HIDDEN`.

    Returns:
        the :class:`FrozenTextStudent` (train mode).
    """
    config = backbone_config(cfg.backbone, cfg.backbone_config, embed_dim=embed_dim,
                             image_size=transform.output_size[0])
    teacher_head = _teacher_image_head(teacher) if head == "teacher" else None
    if teacher_head is not None:
        hidden = teacher_head[0].out_features
    else:
        hidden = (head_hidden or MLP_HIDDEN) if head == "mlp" else None
    tower = build_image_tower(cfg.backbone, config, embed_dim=embed_dim, init=init, head_hidden=hidden)
    if teacher_head is not None:
        _copy_head(tower.head, teacher_head, teacher)
    return FrozenTextStudent(tower, transform, embed_dim=embed_dim, name=cfg.name, teacher=teacher).train()


def _teacher_image_head(teacher: DualEncoder | None):
    """The teacher's MLP image head (a tower teacher's ``image_head``), or a ValueError naming why not."""
    head = getattr(teacher, "image_head", None)
    if not (isinstance(head, nn.Sequential) and len(head) == 3 and isinstance(head[0], nn.Linear)):
        name = getattr(teacher, "name", None)
        raise ValueError(f"student.head='teacher' copies a tower teacher's MLP image head "
                         f"(clipcore.towers, head: mlp); teacher {name!r} has none")
    return head


def _copy_head(student_head: nn.Module, teacher_head: nn.Sequential, teacher: DualEncoder) -> None:
    want = student_head[0].in_features
    if teacher_head[0].in_features != want:
        raise ValueError(f"student.head='teacher': the teacher's image head takes {teacher_head[0].in_features}-d "
                         f"features ({teacher.name}), the student's backbone gives {want}-d")
    student_head.load_state_dict(teacher_head.state_dict())


def build_student(
    name_or_cfg: str | StudentConfig,
    *,
    teacher: DualEncoder | None = None,
    embed_dim: int | None = None,
    tokenizer=None,
    image_size: int | None = None,
    init: str | Path | None = None,
    head: str = "linear",
    head_hidden: int | None = None,
) -> DualEncoder:
    """Build a student as a :class:`DualEncoder` with the teacher's API.

    Args:
        name_or_cfg: a registered name (see ``list_students()``) or a config object.
        teacher: the teacher; gives the default embedding size, tokenizer and image
            normalisation, and the text side of image-only students.
        embed_dim: embedding size; default the teacher's (image-only students must match it).
        tokenizer: CLIP students only: a tokenizer or its hub id/directory; default the teacher's.
        image_size: square input side; default the config's native size.
        init: None (random), ``"teacher"`` (inherit a CLIP ViT teacher's weights, see
            :func:`inherit_from_teacher`) or a hub id/directory of pretrained weights.
        head: image-only students: ``"linear"`` (bias-free, default), ``"mlp"`` (Linear-GELU-Linear,
            hidden 1024, random) or ``"teacher"`` (the tower teacher's own MLP image head, copied:
            the student starts from a projection that already maps EfficientNet-like pooled
            features into the embedding space).
        head_hidden: ``head="mlp"`` only: its hidden size (default 1024); a smaller one keeps the
            head's parameters, and so an int8 bundle, small.

    Returns:
        a ``HFDualEncoder`` (CLIP students) or :class:`FrozenTextStudent`, in train mode.

    Raises:
        UnknownStudentError: the name is not registered.
        ValueError: inconsistent arguments, e.g. a tokenizer for an image-only student.
        TypeError: the name is a text student's (:func:`students.text_student.build_text_student`).
    """
    cfg = get_student_config(name_or_cfg) if isinstance(name_or_cfg, str) else name_or_cfg
    if isinstance(cfg, TextStudentConfig):
        raise TypeError(f"{cfg.name} is a text student (no image side): build it with "
                        "students.build_text_student(cfg, teacher) and pair it with an image model (distill.pair)")
    if head not in HEADS:
        raise ValueError(f"student.head={head!r}; expected one of {', '.join(HEADS)}")
    if head != "linear" and not isinstance(cfg, ImageStudentConfig):
        raise ValueError(f"student.head={head!r} is for image-only students; {cfg.name} is a CLIP student")
    if head_hidden is not None and (head != "mlp" or int(head_hidden) < 1):
        raise ValueError(f"student.head_hidden={head_hidden!r} sizes an MLP head: it needs student.head=mlp "
                         f"(got {head!r}) and a size >= 1")
    if init == TEACHER_INIT and teacher is None:
        raise ValueError("init='teacher' needs teacher=")
    dim = _resolve_embed_dim(embed_dim, teacher)
    # the student's own size, but the teacher's normalisation: both see the same pixel statistics
    base = teacher.image_transform if teacher is not None else ImageTransform()
    transform = base.with_size(image_size or cfg.image_size)
    checkpoint = None if init in (None, TEACHER_INIT) else init
    if isinstance(cfg, ClipStudentConfig):
        student: DualEncoder = build_clip_student(
            cfg, tokenizer=_resolve_tokenizer(tokenizer, teacher), embed_dim=dim, transform=transform, init=checkpoint
        )
    elif isinstance(cfg, ImageStudentConfig):
        if tokenizer is not None:
            raise ValueError(f"{cfg.name} is image-only: its text side and tokenizer are the teacher's")
        student = build_frozen_text_student(cfg, embed_dim=dim, transform=transform, teacher=teacher, init=checkpoint,
                                            head=head, head_hidden=head_hidden)
    else:
        raise TypeError(f"not a student config: {type(cfg).__name__}")
    if init == TEACHER_INIT:
        inherit_from_teacher(student, teacher)
    return student


def freeze_early_blocks(student: DualEncoder, n: int) -> None:
    """Freeze an image-only student's stem and first ``n`` backbone blocks (see the backbone's ``freeze_blocks``).

    Raises:
        ValueError: the student's backbone cannot freeze blocks, or ``n`` is out of range.
    """
    backbone = getattr(getattr(student, "image_tower", None), "backbone", None)
    if not hasattr(backbone, "freeze_blocks"):
        family = getattr(getattr(student, "image_tower", None), "family", type(student).__name__)
        raise ValueError(f"student.freeze_blocks={n}: only efficientnet_lite students freeze blocks, not {family}")
    backbone.freeze_blocks(n)
