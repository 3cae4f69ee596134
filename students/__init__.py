"""Student models: named architectures (``configs``), a registry, one builder, inheritance, save/load.

    from students import build_student, list_students
    student = build_student("vit-tiny-16", teacher=teacher, init="teacher")

Two kinds, both :class:`clipcore.dual_encoder.DualEncoder` with the teacher's API:

* CLIP students (``ClipStudentConfig``): a transformers ``CLIPModel`` with its own tokenizer and
  image size, wrapped in ``HFDualEncoder``; saved as a Hugging Face checkpoint.
* Image-only students (``ImageStudentConfig``): a MobileNetV2 / ResNet / ConvNeXt-V2 / CLIP-ViT
  image tower in the teacher's embedding space, with the frozen teacher's text side
  (``FrozenTextStudent``); saved as ``student.json`` + ``model.safetensors``.
"""

from students.backbones import BACKBONES
from students.checkpoint import load_model, load_student, save_student
from students.clip_student import TextSpec
from students.configs import BUILTIN_STUDENTS, ClipStudentConfig, ImageStudentConfig, StudentConfig, TowerConfig
from students.factory import build_student, freeze_early_blocks
from students.image_only import FrozenTextStudent, ImageTower
from students.inherit import InheritReport, inherit_from_teacher, pick_layers
from students.registry import UnknownStudentError, get_student_config, list_students, register_student

__all__ = [
    "BACKBONES",
    "BUILTIN_STUDENTS",
    "ClipStudentConfig",
    "FrozenTextStudent",
    "ImageStudentConfig",
    "ImageTower",
    "InheritReport",
    "StudentConfig",
    "TextSpec",
    "TowerConfig",
    "UnknownStudentError",
    "build_student",
    "freeze_early_blocks",
    "get_student_config",
    "inherit_from_teacher",
    "list_students",
    "load_model",
    "load_student",
    "pick_layers",
    "register_student",
    "save_student",
]
