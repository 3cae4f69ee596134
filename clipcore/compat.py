"""The one place that knows which transformers major is installed.

The project supports transformers 4.x (from the lower bound in pyproject) and 5.x. Every API
that differs between them is wrapped here, so that the rest of the code has one spelling and
the next break is fixed in one file. What differs, and where it is handled:

* ``bytes_to_unicode`` left ``models.clip.tokenization_clip`` with the slow tokenizers (5.0);
* ``get_image_features`` / ``get_text_features`` return a ``ModelOutput`` whose ``pooler_output``
  is the projected embedding (5.0), a tensor before: :func:`feature_tensor`;
* ``from_pretrained(dtype=...)`` was ``torch_dtype`` before 4.56 (4.45 hands ``dtype`` on to the
  model's constructor, which raises ``TypeError``; 5.x still takes ``torch_dtype`` but warns):
  :func:`dtype_kwargs`;
* weight loading and saving draw progress bars on stderr (5.0), which break one-line CLI
  errors and clutter logs: :func:`quiet_progress`;
* ``save_pretrained(safe_serialization=...)`` is gone (5.0; safetensors is the only format and
  has been the default since 4.35), so callers pass nothing.

Checked and alike in both majors, so with no shim: the byte-level CLIP tokenizer's ids and
``BatchEncoding`` outputs (``tests/test_compat.py`` pins them), and the attention implementation
(both build CLIP with ``sdpa`` by default, and the ONNX export traces it).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import transformers
from packaging.version import Version

TRANSFORMERS_VERSION = Version(transformers.__version__)
TRANSFORMERS_MAJOR = TRANSFORMERS_VERSION.major


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable-symbol table (the byte-level BPE alphabet, in byte order).

    ``convert_slow_tokenizer`` keeps a copy in both majors; the one under ``models.clip`` went
    with the slow tokenizers in 5.0.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode as table

    return table()


def feature_tensor(out: Any) -> torch.Tensor:
    """The embedding tensor of a ``get_image_features`` / ``get_text_features`` result.

    4.x returns the tensor; 5.x a ``BaseModelOutputWithPooling`` whose ``pooler_output`` holds
    the projected features (``image_embeds`` / ``text_embeds`` in other model families).
    """
    if isinstance(out, torch.Tensor):
        return out
    for key in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    raise TypeError(f"unexpected feature output {type(out).__name__}: no pooler_output, image_embeds or text_embeds")


def image_features(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """``model.get_image_features(pixel_values)`` as a tensor, shape (B, D), in both majors."""
    return feature_tensor(model.get_image_features(pixel_values=pixel_values))


def text_features(model: torch.nn.Module, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``model.get_text_features(input_ids, attention_mask)`` as a tensor, shape (B, D), in both majors."""
    return feature_tensor(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def dtype_kwargs(dtype: torch.dtype | None) -> dict[str, torch.dtype]:
    """The ``from_pretrained`` keyword that sets the weights' dtype (``dtype`` from 4.56 on)."""
    if dtype is None:
        return {}
    return {"dtype": dtype} if TRANSFORMERS_VERSION >= Version("4.56") else {"torch_dtype": dtype}


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """No transformers progress bars inside the block; the previous setting is restored after."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
