"""The dual encoder: the one type teachers, students and exported models all are.

:class:`DualEncoder` is the small protocol (image and text features, tokenizer, logit scale) the
whole project speaks. :class:`HFDualEncoder` wraps any transformers model that exposes
``get_image_features`` / ``get_text_features`` and a ``logit_scale`` (``CLIPModel``,
``SiglipModel``, ...). :class:`TowerSplit` sees a dual encoder as tower -> head per modality, for
locking towers and caching their features. Loading by hub id or directory is
:mod:`clipcore.loading`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clipcore import compat
from clipcore.imaging import ImageTransform


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
    def has_own_text_tower(self) -> bool:
        """False for a student that borrows its teacher's frozen text tower: its text embeddings
        are the teacher's, so there is nothing of its own to tokenise for, train or export."""
        return True

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
        return encode_text_with(self, texts)

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
        return compat.image_features(self.model, pixel_values)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return compat.text_features(self.model, input_ids, attention_mask)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return dict(
            self.tokenizer(
                list(texts), padding=self.padding, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
        )


def encode_text_with(model: nn.Module, texts: Sequence[str]) -> torch.Tensor:
    """``model.encode_tokens`` of ``model.tokenize(texts)`` on the model's device: the ``encode_text``
    of every text encoder (``DualEncoder`` and the text students), one string or a non-empty list."""
    if isinstance(texts, str):
        texts = [texts]
    if len(texts) == 0:
        raise ValueError("encode_text got an empty list of texts")
    tokens = {k: v.to(model.device) for k, v in model.tokenize(texts).items()}
    return model.encode_tokens(tokens["input_ids"], tokens.get("attention_mask"))


def module_fingerprint(module: nn.Module, extra: str = "") -> str:
    """sha256 over parameter/buffer names, shapes, dtypes and bytes (plus ``extra``)."""
    h = hashlib.sha256(type(module).__name__.encode())
    h.update(extra.encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def freeze(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode and stop gradients to all of its parameters."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@dataclass
class TowerSplit:
    """A dual encoder seen as (tower -> head) per modality; features = head(tower(x))."""

    image_tower: nn.Module
    image_tower_fn: Callable[[torch.Tensor], torch.Tensor]
    image_head: nn.Module
    image_blocks: Sequence[nn.Module]  # the tower's last blocks, in order, for partial unfreezing
    text_tower: nn.Module
    text_tower_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    text_head: nn.Module
    text_blocks: Sequence[nn.Module]
