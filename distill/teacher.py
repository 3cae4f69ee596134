"""CLIP-family dual encoders: the teacher protocol and the Hugging Face loader.

Any model that exposes ``get_image_features`` / ``get_text_features`` and a ``logit_scale``
(``CLIPModel``, ``SiglipModel``, ...) loads by hub id or local directory through
:func:`load_dual_encoder`. A teacher assembled from other towers implements the same small
:class:`DualEncoder` interface.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distill.imaging import ImageTransform


class ModelNotFoundError(OSError):
    """A model id or path could not be resolved; the message says what to do."""


class DualEncoder(nn.Module):
    """Image and text towers that map into one embedding space.

    Subclasses implement :meth:`image_features`, :meth:`text_features`, :meth:`tokenize` and
    :attr:`log_logit_scale`; everything else (normalisation, logits) is shared here so that
    teachers, students and exported models agree on one definition.
    """

    name: str = "dual-encoder"
    image_transform: ImageTransform

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @property
    def log_logit_scale(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def embed_dim(self) -> int:
        raise NotImplementedError

    @property
    def logit_scale(self) -> torch.Tensor:
        """The multiplicative scale (``exp`` of the stored log scale)."""
        return self.log_logit_scale.exp()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings, shape (B, D)."""
        return F.normalize(self.image_features(pixel_values).float(), dim=-1)

    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised text embeddings from token ids, shape (B, D)."""
        return F.normalize(self.text_features(input_ids, attention_mask).float(), dim=-1)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Tokenise with this model's tokenizer and return L2-normalised embeddings."""
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) == 0:
            raise ValueError("encode_text got an empty list of texts")
        tokens = {k: v.to(self.device) for k, v in self.tokenize(texts).items()}
        return self.encode_tokens(tokens["input_ids"], tokens.get("attention_mask"))

    def logits(self, image_emb: torch.Tensor, text_emb: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Temperature-scaled logits ``logit_scale * cos(image, text) / T``, shape (B_img, B_txt)."""
        if image_emb.shape[-1] != text_emb.shape[-1]:
            raise ValueError(
                f"embedding sizes differ: image {tuple(image_emb.shape)} vs text {tuple(text_emb.shape)}"
            )
        return self.logit_scale.to(image_emb.dtype) * image_emb @ text_emb.t() / temperature

    def fingerprint(self) -> str:
        """A stable hash of the weights, transform and class; keys every on-disk cache."""
        return module_fingerprint(self, extra=self.image_transform.to_json())


class HFDualEncoder(DualEncoder):
    """Wraps a transformers model with ``get_image_features``/``get_text_features``."""

    def __init__(self, model: nn.Module, tokenizer, image_transform: ImageTransform, name: str):
        super().__init__()
        for attr in ("get_image_features", "get_text_features", "logit_scale"):
            if not hasattr(model, attr):
                raise TypeError(
                    f"{name}: {type(model).__name__} is not a CLIP-family dual encoder (it has no `{attr}`); "
                    "supported are models with get_image_features, get_text_features and logit_scale, "
                    "e.g. CLIPModel or SiglipModel"
                )
        self.model = model
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.name = name
        model_type = getattr(model.config, "model_type", "")
        text_cfg = getattr(model.config, "text_config", model.config)
        self.max_length = int(getattr(text_cfg, "max_position_embeddings", 77))
        # SigLIP was trained on max_length padding; CLIP pools at the EOS token so dynamic padding is exact.
        self.padding = "max_length" if model_type.startswith("siglip") else True

    @property
    def embed_dim(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "projection_dim", None) or cfg.text_config.hidden_size)

    @property
    def log_logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _as_tensor(self.model.get_image_features(pixel_values=pixel_values))

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return _as_tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return dict(
            self.tokenizer(
                list(texts), padding=self.padding, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
        )


def _as_tensor(out) -> torch.Tensor:
    # transformers >=4.58 may return a ModelOutput from get_*_features; older versions a tensor.
    if isinstance(out, torch.Tensor):
        return out
    for key in ("pooler_output", "image_embeds", "text_embeds"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    raise TypeError(f"unexpected feature output {type(out).__name__}")


def module_fingerprint(module: nn.Module, extra: str = "") -> str:
    """sha256 over parameter/buffer names, shapes, dtypes and bytes (plus ``extra``)."""
    h = hashlib.sha256(type(module).__name__.encode())
    h.update(extra.encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _resolve_error(name_or_path: str, exc: Exception) -> ModelNotFoundError:
    path = Path(name_or_path)
    if path.exists() and path.is_dir():
        return ModelNotFoundError(
            f"{name_or_path}: directory is not a loadable Hugging Face model "
            f"(no config.json or weights; {type(exc).__name__}: {exc})"
        )
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

    from distill import towers

    if towers.is_tower_directory(name_or_path):  # a dual encoder assembled from towers (distill.towers)
        return towers.load_tower_dual_encoder(name_or_path).to(dtype=dtype, device=device).eval()
    try:
        config = AutoConfig.from_pretrained(name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        if random_init:
            model = AutoModel.from_config(config)
        else:
            model = AutoModel.from_pretrained(name_or_path, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise _resolve_error(name_or_path, exc) from exc
    transform = load_image_transform(name_or_path)
    encoder = HFDualEncoder(model.to(dtype=dtype), tokenizer, transform, name=str(name_or_path))
    return encoder.to(device=device).eval()


def load_teacher(name_or_path: str, **kwargs) -> DualEncoder:
    """Load a dual encoder frozen for use as a teacher (eval mode, no gradients)."""
    return freeze(load_dual_encoder(name_or_path, **kwargs))


def freeze(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode and stop gradients to all of its parameters."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
