"""Build-time side of open-vocabulary bundles: the text tower's ONNX graphs and its device tokenizer.

The text tower is the student's own, or, for image-only students (whose text side is the frozen
teacher's), the teacher's. The tokenizer is the model's fast (Rust) tokenizer saved as a
``tokenizers`` file with the model's truncation and padding baked in, so the device needs no
transformers; :func:`save_device_tokenizer` checks it against ``model.tokenize`` before it is
used. See :mod:`exports.text_runtime` for the device side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from clipcore.dual_encoder import DualEncoder
from exports.text_runtime import DeviceTokenizer

# a fixed probe that every device tokenizer must reproduce exactly (ids and mask), padding included
PROBE_TEXTS = ("a photo of a cat.", "a", "an extremely long description " * 12, "un café crème à Zürich",
               "東京の夜景", "emoji 🐈 and tabs\tand  spaces")


class TokenizerExportError(ValueError):
    """The model's tokenizer cannot be reproduced by a ``tokenizers`` file; names the model."""


def text_model(model: DualEncoder) -> DualEncoder:
    """The dual encoder whose text tower a bundle ships: ``model``, or its frozen teacher."""
    from students.image_only import FrozenTextStudent

    if isinstance(model, FrozenTextStudent):
        if model.teacher is None:
            raise TokenizerExportError(f"{model.name}: an image-only student without its teacher has no text tower")
        return model.teacher
    return model


def tokenizer_settings(model: DualEncoder) -> tuple[int, bool]:
    """(max_length, pad to max_length) as ``model.tokenize`` applies them."""
    if hasattr(model, "max_length"):  # HFDualEncoder: CLIP, SigLIP, CLIP students
        return int(model.max_length), getattr(model, "padding", True) == "max_length"
    spec = getattr(model, "spec", None)
    if spec is not None and hasattr(spec, "text_max_length"):  # the reference towers
        return int(spec.text_max_length), False
    raise TokenizerExportError(f"{model.name}: unknown tokenizer settings ({type(model).__name__})")


def backend_tokenizer(model: DualEncoder):
    """A copy of the model's ``tokenizers.Tokenizer``, converted from a slow tokenizer if need be."""
    from tokenizers import Tokenizer

    hf = getattr(model, "tokenizer", None)
    if hf is None:
        raise TokenizerExportError(f"{model.name}: has no tokenizer attribute")
    if getattr(hf, "is_fast", False):
        return Tokenizer.from_str(hf.backend_tokenizer.to_str())
    from transformers.convert_slow_tokenizer import convert_slow_tokenizer

    return convert_slow_tokenizer(hf)


def save_device_tokenizer(model: DualEncoder, path: str | Path) -> Path:
    """Write ``model``'s tokenizer as a ``tokenizers`` file and check it reproduces ``model.tokenize``.

    Raises:
        TokenizerExportError: no fast tokenizer, or the file gives other ids or masks on the probe.
    """
    hf = model.tokenizer
    tok = backend_tokenizer(model)
    max_length, pad_to_max = tokenizer_settings(model)
    tok.enable_truncation(max_length=max_length)
    pad_id = hf.pad_token_id if hf.pad_token_id is not None else 0
    tok.enable_padding(pad_id=pad_id, pad_token=hf.pad_token or "[PAD]", length=max_length if pad_to_max else None)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    mismatch = compare_tokenizers(model, DeviceTokenizer(path), PROBE_TEXTS)
    if mismatch:
        path.unlink()
        raise TokenizerExportError(f"{model.name}: the tokenizers file disagrees with model.tokenize on {mismatch!r}")
    return path


def compare_tokenizers(model: DualEncoder, device: DeviceTokenizer, texts: Sequence[str]) -> list[str]:
    """The texts of ``texts`` whose ids or attention mask differ between the two (one batch)."""
    want = model.tokenize(list(texts))
    got = device(list(texts))
    ids = want["input_ids"].numpy()
    mask = want["attention_mask"].numpy() if "attention_mask" in want else np.ones_like(ids)
    if ids.shape != got["input_ids"].shape:
        return list(texts)
    bad = (ids != got["input_ids"]).any(axis=1) | (mask != got["attention_mask"]).any(axis=1)
    return [t for t, b in zip(texts, bad) if b]
