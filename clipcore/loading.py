"""Load a dual encoder by hub id or local directory.

Any model that exposes ``get_image_features`` / ``get_text_features`` and a ``logit_scale``
(``CLIPModel``, ``SiglipModel``, ...) loads through :func:`load_dual_encoder`, and so does a
directory saved by :class:`clipcore.towers.TowerDualEncoder`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from clipcore import compat, towers
from clipcore.dual_encoder import DualEncoder, HFDualEncoder, ModelNotFoundError, freeze
from clipcore.imaging import ImageTransform


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _path_like(name: str) -> bool:
    """True for names that can only be local paths: a hub id is ``name`` or ``owner/name``."""
    return os.path.isabs(name) or name.startswith(("./", "../", "~")) or name.count("/") > 1 or name.endswith("/")


def _resolve_error(name_or_path: str, exc: Exception) -> ModelNotFoundError:
    path = Path(name_or_path)
    if path.is_dir():
        return ModelNotFoundError(
            f"{name_or_path}: directory is not a loadable Hugging Face model "
            f"(no config.json or weights; {type(exc).__name__}: {exc})"
        )
    if path.exists():
        return ModelNotFoundError(f"{name_or_path}: is a file; a model is a directory or a hub id (owner/name)")
    if _path_like(name_or_path):  # the hub's own message would only complain about the id's characters
        return ModelNotFoundError(f"{name_or_path}: no such directory (and not a hub id, which reads owner/name)")
    hint = (
        f"'{name_or_path}' is not a local directory and could not be loaded from the Hugging Face "
        f"cache{' while offline (HF_HUB_OFFLINE=1)' if _hub_offline() else ''}. On a connected machine run "
        f"`huggingface-cli download {name_or_path} --local-dir DIR` and pass DIR instead; "
        "to build the architecture with random weights from a config-only directory, use random_init "
        "(CLI: --random-init)."
    )
    return ModelNotFoundError(f"{hint} (cause: {type(exc).__name__}: {str(exc).splitlines()[0][:300]})")


def load_image_transform(name_or_path: str) -> ImageTransform:
    """Read the image processor settings of a model directory or hub id."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(name_or_path, use_fast=False)
    except (OSError, ValueError) as exc:
        raise _resolve_error(name_or_path, exc) from exc
    return ImageTransform.from_processor_config(processor.to_dict())


def load_dual_encoder(
    name_or_path: str,
    *,
    random_init: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> DualEncoder:
    """Load a CLIP-family model, its tokenizer and its image transform.

    Args:
        name_or_path: hub id (e.g. ``openai/clip-vit-base-patch32``) or local directory.
        random_init: build the architecture from the config alone (random weights); for
            benchmarks with config-only directories such as ``../shared/data/clip-vit-base-patch32``.
        dtype, device: where the weights live.

    Raises:
        ModelNotFoundError: the id cannot be resolved (offline, typo, not a model directory).
        TypeError: the model is not a dual encoder.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    if towers.is_tower_directory(name_or_path):  # a dual encoder assembled from towers (clipcore.towers)
        return towers.load_tower_dual_encoder(name_or_path).to(dtype=dtype, device=device).eval()
    try:
        config = AutoConfig.from_pretrained(name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        if random_init:
            model = AutoModel.from_config(config)
        else:
            with compat.quiet_progress():
                model = AutoModel.from_pretrained(name_or_path, **compat.dtype_kwargs(dtype))
    except (OSError, ValueError) as exc:
        raise _resolve_error(name_or_path, exc) from exc
    transform = load_image_transform(name_or_path)
    encoder = HFDualEncoder(model.to(dtype=dtype), tokenizer, transform, name=str(name_or_path))
    return encoder.to(device=device).eval()


def load_teacher(name_or_path: str, **kwargs) -> DualEncoder:
    """Load a dual encoder frozen for use as a teacher (eval mode, no gradients)."""
    return freeze(load_dual_encoder(name_or_path, **kwargs))
