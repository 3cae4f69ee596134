"""One builder for every student: a named (or given) config, a teacher, and an initialisation."""

from __future__ import annotations

from pathlib import Path

from clipcore.dual_encoder import DualEncoder
from clipcore.imaging import ImageTransform
from students.backbones import backbone_config, build_image_tower
from students.clip_student import build_clip_student
from students.configs import ClipStudentConfig, ImageStudentConfig, StudentConfig
from students.image_only import FrozenTextStudent
from students.inherit import inherit_from_teacher
from students.registry import get_student_config

TEACHER_INIT = "teacher"


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
) -> FrozenTextStudent:
    """An image-only student from its config.

    Args:
        cfg: the architecture.
        embed_dim: the teacher's embedding size.
        transform: the student's image transform; its crop side is the backbone's image size.
        teacher: supplies text features and tokenisation; may be attached later.
        init: hub id or directory of pretrained backbone weights.

    Returns:
        the :class:`FrozenTextStudent` (train mode).
    """
    config = backbone_config(cfg.backbone, cfg.backbone_config, embed_dim=embed_dim,
                             image_size=transform.output_size[0])
    tower = build_image_tower(cfg.backbone, config, embed_dim=embed_dim, init=init)
    return FrozenTextStudent(tower, transform, embed_dim=embed_dim, name=cfg.name, teacher=teacher).train()


def build_student(
    name_or_cfg: str | StudentConfig,
    *,
    teacher: DualEncoder | None = None,
    embed_dim: int | None = None,
    tokenizer=None,
    image_size: int | None = None,
    init: str | Path | None = None,
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

    Returns:
        a ``HFDualEncoder`` (CLIP students) or :class:`FrozenTextStudent`, in train mode.

    Raises:
        UnknownStudentError: the name is not registered.
        ValueError: inconsistent arguments, e.g. a tokenizer for an image-only student.
    """
    cfg = get_student_config(name_or_cfg) if isinstance(name_or_cfg, str) else name_or_cfg
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
        student = build_frozen_text_student(cfg, embed_dim=dim, transform=transform, teacher=teacher, init=checkpoint)
    else:
        raise TypeError(f"not a student config: {type(cfg).__name__}")
    if init == TEACHER_INIT:
        inherit_from_teacher(student, teacher)
    return student
