"""Save and load students as directories.

CLIP students are plain Hugging Face checkpoints (``CLIPModel.from_pretrained`` and
``clipcore.loading.load_dual_encoder`` read them) plus ``student.json``. Image-only students are
``student.json`` (kind, backbone config, embedding size, image transform, teacher reference) and
``model.safetensors`` holding only the student's own tensors: the frozen teacher is referenced,
never copied. Text students (``kind: text``) are ``student.json``, ``model.safetensors`` and their
tokenizer's files; a pair of an image model and a text student (``kind: paired``) holds a copy of
each under ``image/`` and ``text/``.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipcore import compat
from clipcore.dual_encoder import DualEncoder, HFDualEncoder
from clipcore.imaging import ImageTransform
from clipcore.loading import load_dual_encoder, load_teacher
from students.backbones import backbone_config, build_image_tower
from students.image_only import FrozenTextStudent
from students.paired import PairedStudent, check_pair
from students.qat import load_ranges, save_ranges
from students.text_student import TextStudent, text_student_from_meta, text_student_meta

STUDENT_FILE = "student.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
KINDS = ("clip", "frozen_text", "text", "paired")
PAIR_IMAGE, PAIR_TEXT = "image", "text"  # the pair's two sub-directories
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
        # absent or null: embeddings as the tower gives them; else FrozenTextStudent.set_mean_share's values
        "mean_share": None if student.mean_axis is None else {
            "share": student.mean_share, "axis": student.mean_axis.cpu().tolist()},
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
    ranges = getattr(getattr(student, "image_tower", None), "qat_ranges", None)
    if ranges:  # a QAT student: the static int8 export uses the ranges it trained under
        save_ranges(ranges, directory)
    return directory


def _read_meta(directory: Path) -> dict[str, Any]:
    path = directory / STUDENT_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} has no {STUDENT_FILE}; it was not written by save_student "
            "(a Hugging Face CLIP checkpoint loads with clipcore.loading.load_dual_encoder)"
        )
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION or meta.get("kind") not in KINDS:
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


def load_student(directory: str | Path, *, teacher: DualEncoder | str | None = None,
                 with_teacher: bool = True) -> DualEncoder:
    """Rebuild a student written by :func:`save_student` or :func:`save_pair`, in eval mode.

    Args:
        directory: the saved student.
        teacher: image-only students: the teacher (or its hub id/directory) whose text tower they
            use; None loads the one recorded in ``student.json``. Ignored for CLIP students.
        with_teacher: False leaves an image-only student without a teacher (its image side only,
            as a pair uses it): the recorded teacher is not loaded.

    Returns:
        an ``HFDualEncoder``, :class:`FrozenTextStudent` or :class:`PairedStudent`.

    Raises:
        FileNotFoundError: no ``student.json``.
        ValueError: an unknown format, or a teacher of another embedding size.
        TypeError: a text student, which has no image side (:func:`load_text_student` loads it).
    """
    directory = Path(directory)
    meta = _read_meta(directory)
    if meta["kind"] == "clip":
        return load_dual_encoder(str(directory))
    if meta["kind"] == "paired":
        return load_pair(directory)
    if meta["kind"] == "text":
        raise TypeError(f"{directory} is a text student (no image side): pair it with an image model "
                        f"(python -m distill.pair --image IMAGE_MODEL --text {directory} --out PAIR_DIR) "
                        "or load it with students.load_text_student")
    from safetensors.torch import load_model as load_weights

    transform = ImageTransform.from_dict(meta["image_transform"])
    config = backbone_config(meta["backbone"], meta["backbone_config"], embed_dim=meta["embed_dim"],
                             image_size=transform.output_size[0])
    tower = build_image_tower(meta["backbone"], config, embed_dim=meta["embed_dim"],
                              head_hidden=meta.get("head_hidden"))
    student = FrozenTextStudent(tower, transform, embed_dim=meta["embed_dim"], name=meta["name"],
                                teacher=_resolve_teacher(teacher, meta.get("teacher")) if with_teacher else None)
    load_weights(student, str(directory / WEIGHTS_FILE), strict=True)
    if meta.get("mean_share"):
        student.set_mean_share(torch.tensor(meta["mean_share"]["axis"]), meta["mean_share"]["share"])
    ranges = load_ranges(directory)
    if ranges:
        tower.qat_ranges = ranges
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


# ----------------------------------------------------------------------------- text students, pairs


def save_text_student(student: TextStudent, directory: str | Path, *, teacher: DualEncoder | None = None) -> Path:
    """Write a text student: ``student.json``, ``model.safetensors`` and its tokenizer's files.

    Args:
        teacher: recorded (name, embedding size, fingerprint) as the space the student embeds into.
    """
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_model(student, str(directory / WEIGHTS_FILE), force_contiguous=True)
    student.tokenizer.save_pretrained(directory)
    meta = dict(text_student_meta(student), format_version=FORMAT_VERSION, name=student.name,
                teacher=_teacher_reference(teacher))
    (directory / STUDENT_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return directory


def load_text_student(directory: str | Path) -> TextStudent:
    """Rebuild a text student written by :func:`save_text_student`, in eval mode.

    Raises:
        FileNotFoundError: no ``student.json``.
        ValueError: the directory holds another kind of model.
    """
    from safetensors.torch import load_model as load_weights
    from transformers import AutoTokenizer

    directory = Path(directory)
    meta = _read_meta(directory)
    if meta["kind"] != "text":
        raise ValueError(f"{directory / STUDENT_FILE}: a {meta['kind']!r} model, not a text student")
    student = text_student_from_meta(meta, AutoTokenizer.from_pretrained(str(directory)), meta["name"])
    load_weights(student, str(directory / WEIGHTS_FILE), strict=True)
    return student.eval()


def _load_image_side(directory: Path) -> DualEncoder:
    """The image model of a pair; an image-only student without its teacher (the pair brings the text side)."""
    if (directory / STUDENT_FILE).is_file():
        return load_student(directory, with_teacher=False)
    return load_dual_encoder(str(directory))


def save_pair(image_dir: str | Path, text_dir: str | Path, out: str | Path, *, name: str | None = None) -> Path:
    """Write a model directory pairing a saved image model with a saved text student.

    Both are loaded and checked first, then copied under ``out/image`` and ``out/text``, so the pair
    keeps working when either is retrained or moved.

    Args:
        image_dir: any model directory ``load_model`` reads (an image-only student, a teacher, ...).
        text_dir: a :func:`save_text_student` directory.
        out: the pair's directory (must not exist yet, or be empty).
        name: the pair's name; default ``"<image name>+<text name>"``.

    Raises:
        ValueError: the embedding sizes differ (naming both sizes and directories), ``text_dir`` is
            not a text student, or ``out`` is not empty.
    """
    image_dir, text_dir, out = Path(image_dir), Path(text_dir), Path(out)
    image, text = _load_image_side(image_dir), load_text_student(text_dir)
    check_pair(image, text, str(image_dir), str(text_dir))
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: exists and is not empty; a pair is written into a new directory")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(image_dir, out / PAIR_IMAGE)
    shutil.copytree(text_dir, out / PAIR_TEXT)
    meta = {"format_version": FORMAT_VERSION, "kind": "paired", "name": name or f"{image.name}+{text.name}",
            "image": PAIR_IMAGE, "text": PAIR_TEXT, "embed_dim": image.embed_dim,
            "image_transform": image.image_transform.to_dict(),
            "sources": {"image": str(image_dir.resolve()), "text": str(text_dir.resolve())}}
    (out / STUDENT_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out


def load_pair(directory: str | Path) -> PairedStudent:
    """Rebuild a :func:`save_pair` directory as a :class:`PairedStudent`, in eval mode.

    Raises:
        ValueError: its two models embed into spaces of different sizes (naming both).
    """
    directory = Path(directory)
    meta = _read_meta(directory)
    image_dir, text_dir = directory / meta.get("image", PAIR_IMAGE), directory / meta.get("text", PAIR_TEXT)
    image, text = _load_image_side(image_dir), load_text_student(text_dir)
    check_pair(image, text, str(image_dir), str(text_dir))
    return PairedStudent(image, text, name=meta.get("name", directory.name)).eval()
