"""A dual encoder from two models: the image side of one, the text side of a text student.

An image-only student (:class:`students.image_only.FrozenTextStudent`) borrows the teacher's text
tower, 24x its own size for the general student. :class:`PairedStudent` replaces that tower with
a :class:`students.text_student.TextStudent` distilled into the same embedding space, so that the
whole model is small. It speaks the :class:`DualEncoder` protocol, so evaluation, the benchmark
and export take it like any model; saved, it is a directory that ``students.load_model`` loads
(:func:`students.checkpoint.save_pair`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from clipcore.dual_encoder import DualEncoder
from students.text_student import TextStudent


def check_pair(image_model: DualEncoder, text_student: TextStudent, image_from: str = "", text_from: str = "") -> None:
    """Raise a ValueError unless both embed into spaces of one size, naming both sizes and sources."""
    if image_model.embed_dim != text_student.embed_dim:
        image = f" ({image_from})" if image_from else ""
        text = f" ({text_from})" if text_from else ""
        raise ValueError(
            f"cannot pair image model {image_model.name!r}{image} embedding into {image_model.embed_dim} dims "
            f"with text student {text_student.name!r}{text} embedding into {text_student.embed_dim}; a text "
            "student must be distilled from the teacher whose embedding space the image model shares")


class PairedStudent(DualEncoder):
    """``image_model``'s image features and logit scale, ``text_student``'s text features and tokenizer."""

    def __init__(self, image_model: DualEncoder, text_student: TextStudent, *, name: str):
        super().__init__()
        check_pair(image_model, text_student)
        self.image_model = image_model
        self.text_student = text_student
        self.image_transform = image_model.image_transform
        self.name = name
        # what exports.text_bundle reads to write the device tokenizer (HFDualEncoder's attributes)
        self.tokenizer = text_student.tokenizer
        self.max_length = text_student.max_length
        self.padding = True

    @property
    def embed_dim(self) -> int:
        return self.image_model.embed_dim

    @property
    def log_logit_scale(self) -> torch.Tensor:
        # the image model's: a student trained its own against the teacher's text embeddings, which
        # the text student reproduces
        return self.image_model.log_logit_scale

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.image_model.image_features(pixel_values)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.image_model.encode_image(pixel_values)  # with whatever the image model does after its tower

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.text_student.text_features(input_ids, attention_mask)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.text_student.tokenize(texts)
