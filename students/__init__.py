"""Student models: named architectures (``configs``), a registry, one builder, inheritance, save/load.

    from students import build_student, list_students
    student = build_student("vit-tiny-16", teacher=teacher, init="teacher")

Two kinds, both :class:`clipcore.dual_encoder.DualEncoder` with the teacher's API:

* CLIP students (``ClipStudentConfig``): a transformers ``CLIPModel`` with its own tokenizer and
  image size, wrapped in ``HFDualEncoder``; saved as a Hugging Face checkpoint.
* Image-only students (``ImageStudentConfig``): a MobileNetV2 / ResNet / ConvNeXt-V2 / CLIP-ViT
  image tower in the teacher's embedding space, with the frozen teacher's text side
  (``FrozenTextStudent``); saved as ``student.json`` + ``model.safetensors``.

Text students (``TextStudentConfig``, :mod:`students.text_student`) are a third kind: a small
BERT sentence encoder inherited from a tower teacher's MiniLM, with no image side;
:class:`PairedStudent` pairs one with any image model (``save_pair``; ``load_model`` loads the pair).
"""

from students.backbones import BACKBONES
from students.checkpoint import (
    load_model,
    load_pair,
    load_student,
    load_text_student,
    save_pair,
    save_student,
    save_text_student,
)
from students.clip_student import TextSpec
from students.configs import (
    BUILTIN_STUDENTS,
    BUILTIN_TEXT_STUDENTS,
    ClipStudentConfig,
    ImageStudentConfig,
    StudentConfig,
    TextStudentConfig,
    TowerConfig,
)
from students.factory import build_student, freeze_early_blocks
from students.image_only import FrozenTextStudent, ImageTower
from students.inherit import InheritReport, inherit_from_teacher, pick_layers
from students.paired import PairedStudent
from students.text_student import TextStudent, build_text_student, inherit_text_from_teacher
from students.registry import UnknownStudentError, get_student_config, list_students, register_student

__all__ = [
    "BACKBONES",
    "BUILTIN_STUDENTS",
    "BUILTIN_TEXT_STUDENTS",
    "ClipStudentConfig",
    "FrozenTextStudent",
    "ImageStudentConfig",
    "ImageTower",
    "InheritReport",
    "PairedStudent",
    "StudentConfig",
    "TextSpec",
    "TextStudent",
    "TextStudentConfig",
    "TowerConfig",
    "UnknownStudentError",
    "build_student",
    "build_text_student",
    "freeze_early_blocks",
    "get_student_config",
    "inherit_from_teacher",
    "inherit_text_from_teacher",
    "list_students",
    "load_model",
    "load_pair",
    "load_student",
    "load_text_student",
    "pick_layers",
    "register_student",
    "save_pair",
    "save_student",
    "save_text_student",
]
