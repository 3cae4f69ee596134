"""Save and load students as directories.

CLIP students are plain Hugging Face checkpoints (``CLIPModel.from_pretrained`` and
``clipcore.loading.load_dual_encoder`` read them) plus ``student.json``. Image-only students are
``student.json`` (kind, backbone config, embedding size, image transform, teacher reference) and
``model.safetensors`` holding only the student's own tensors: the frozen teacher is referenced,
never copied.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from clipcore import compat
from clipcore.dual_encoder import DualEncoder, HFDualEncoder
from clipcore.imaging import ImageTransform
from clipcore.loading import load_dual_encoder, load_teacher
from students.backbones import backbone_config, build_image_tower
from students.image_only import FrozenTextStudent

STUDENT_FILE = "student.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
_PIL_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def processor_kwargs(transform: ImageTransform) -> dict[str, Any]:
    """``CLIPImageProcessor`` arguments reproducing ``transform`` (read back by ``load_image_transform``)."""
    size = transform.size
    crop = transform.crop_size
    return dict(
        size={"shortest_edge": size} if isinstance(size, int) else {"height": size[0], "width": size[1]},
        do_center_crop=crop is not None,
        crop_size={"height": crop[0], "width": crop[1]} if crop is not None else None,
        image_mean=list(transform.mean),
        image_std=list(transform.std),
        resample=_PIL_RESAMPLE[transform.resample],
        rescale_factor=transform.rescale_factor,
    )


def _teacher_reference(teacher: DualEncoder | None) -> dict[str, Any] | None:
    if teacher is None:
        return None
    path = Path(teacher.name)
    # a local directory is stored absolute so the student loads from any working directory
    name = str(path.resolve()) if path.is_dir() else teacher.name
    return {"name_or_path": name, "embed_dim": teacher.embed_dim, "fingerprint": teacher.fingerprint()}


def _save_clip(student: HFDualEncoder, directory: Path) -> dict[str, Any]:
    from transformers import CLIPImageProcessor

    with compat.quiet_progress():
        student.model.save_pretrained(directory)  # safetensors: the only format in 5.x, the default in 4.x
    student.tokenizer.save_pretrained(directory)
    CLIPImageProcessor(**processor_kwargs(student.image_transform)).save_pretrained(directory)
    return {"kind": "clip"}


def _save_frozen_text(student: FrozenTextStudent, directory: Path) -> dict[str, Any]:
    from safetensors.torch import save_model

    # only the student (the teacher is not a submodule); channels_last CNN weights are made contiguous
    save_model(student, str(directory / WEIGHTS_FILE), force_contiguous=True)
    tower = student.image_tower
    return {
        "kind": "frozen_text",
        "backbone": tower.family,
        "backbone_config": json.loads(tower.backbone.config.to_json_string(use_diff=False)),
        "embed_dim": student.embed_dim,
        # absent or null: the bias-free linear head; else the MLP head's hidden size
        "head_hidden": tower.head[0].out_features if isinstance(tower.head, nn.Sequential) else None,
        "teacher": _teacher_reference(student.teacher),
    }


def save_student(student: DualEncoder, directory: str | Path) -> Path:
    """Write ``student`` to ``directory`` (created if needed).

    Args:
        student: a CLIP student (``HFDualEncoder``) or a :class:`FrozenTextStudent`.
        directory: output directory.

    Returns:
        the directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(student, FrozenTextStudent):
        meta = _save_frozen_text(student, directory)
    elif isinstance(student, HFDualEncoder):
        meta = _save_clip(student, directory)
    else:
        raise TypeError(f"cannot save a {type(student).__name__}; expected HFDualEncoder or FrozenTextStudent")
    meta.update(format_version=FORMAT_VERSION, name=student.name, image_transform=student.image_transform.to_dict())
    (directory / STUDENT_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return directory


def _read_meta(directory: Path) -> dict[str, Any]:
    path = directory / STUDENT_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} has no {STUDENT_FILE}; it was not written by save_student "
            "(a Hugging Face CLIP checkpoint loads with clipcore.loading.load_dual_encoder)"
        )
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION or meta.get("kind") not in ("clip", "frozen_text"):
        raise ValueError(f"{path}: unsupported student format {meta.get('format_version')} / kind {meta.get('kind')}")
    return meta


def _resolve_teacher(teacher: DualEncoder | str | None, reference: dict[str, Any] | None) -> DualEncoder | None:
    if isinstance(teacher, (str, Path)):
        teacher = load_teacher(str(teacher))
    if teacher is None and reference is not None:
        teacher = load_teacher(reference["name_or_path"])
    if teacher is not None and reference is not None and teacher.fingerprint() != reference["fingerprint"]:
        warnings.warn(
            f"teacher {teacher.name!r} differs from the one the student was saved with "
            f"({reference['name_or_path']!r}); its text embeddings may not match the image tower",
            stacklevel=3,
        )
    return teacher


def load_student(directory: str | Path, *, teacher: DualEncoder | str | None = None) -> DualEncoder:
    """Rebuild a student written by :func:`save_student`, in eval mode.

    Args:
        directory: the saved student.
        teacher: image-only students: the teacher (or its hub id/directory) whose text tower they
            use; None loads the one recorded in ``student.json``. Ignored for CLIP students.

    Returns:
        an ``HFDualEncoder`` or :class:`FrozenTextStudent`.

    Raises:
        FileNotFoundError: no ``student.json``.
        ValueError: an unknown format, or a teacher of another embedding size.
    """
    directory = Path(directory)
    meta = _read_meta(directory)
    if meta["kind"] == "clip":
        return load_dual_encoder(str(directory))
    from safetensors.torch import load_model as load_weights

    transform = ImageTransform.from_dict(meta["image_transform"])
    config = backbone_config(meta["backbone"], meta["backbone_config"], embed_dim=meta["embed_dim"],
                             image_size=transform.output_size[0])
    tower = build_image_tower(meta["backbone"], config, embed_dim=meta["embed_dim"],
                              head_hidden=meta.get("head_hidden"))
    student = FrozenTextStudent(tower, transform, embed_dim=meta["embed_dim"], name=meta["name"],
                                teacher=_resolve_teacher(teacher, meta.get("teacher")))
    load_weights(student, str(directory / WEIGHTS_FILE), strict=True)
    return student.eval()


def load_model(name_or_path: str | Path, *, teacher: DualEncoder | str | None = None, random_init: bool = False,
               device: str = "cpu") -> DualEncoder:
    """Any model this project trains, exports or evaluates, in eval mode.

    A :func:`save_student` directory loads with :func:`load_student` (an image-only student takes
    ``teacher`` for its text side, else the teacher recorded in ``student.json``); anything else --
    a CLIP-family hub id or directory, a tower dual encoder -- with ``load_dual_encoder``.

    Raises:
        ModelNotFoundError: the id or directory cannot be resolved.
    """
    if (Path(name_or_path) / STUDENT_FILE).is_file():
        return load_student(name_or_path, teacher=teacher).to(device)
    return load_dual_encoder(str(name_or_path), random_init=random_init, device=device)
