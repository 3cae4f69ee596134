"""Vision backbones of image-only students, built from transformers configs (no download)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import nn

from clipcore import compat
from clipcore.dual_encoder import ModelNotFoundError
from clipcore.towers import projection_head
from students.efficientnet_lite import EfficientNetLiteBackbone, EfficientNetLiteConfig
from students.image_only import ImageTower


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone family.

    Attributes:
        config_class, model_class: names in the ``transformers`` namespace, or the classes
            themselves for a backbone that is not a transformers model (EfficientNet-Lite).
        feature_dim: pooled feature size of a built model; None when the model projects itself.
        scratch_init: re-initialises a randomly built model in place, where transformers' own
            init (meant to be overwritten by pretrained weights) is a poor start.
    """

    config_class: str | type
    model_class: str | type
    feature_dim: Callable[[nn.Module], int] | None = None
    scratch_init: Callable[[nn.Module], None] | None = None

    @property
    def projects(self) -> bool:
        """The model already ends in a projection to the embedding (``projection_dim``)."""
        return self.feature_dim is None

    def classes(self) -> tuple[type, type]:
        """(config class, model class), imported from transformers where they are named."""
        def resolve(cls: str | type) -> type:
            if isinstance(cls, type):
                return cls
            import transformers

            return getattr(transformers, cls)

        return resolve(self.config_class), resolve(self.model_class)


def kaiming_convs(model: nn.Module) -> None:
    """torchvision's CNN init: He-normal convolutions (fan_out), zero biases.

    transformers initialises MobileNetV2 convolutions with N(0, 0.02): through 50 layers the
    activations shrink to ~1e-11, so a fresh model in eval mode (BatchNorm on running statistics)
    outputs vectors too small to normalise.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out")
            if module.bias is not None:
                nn.init.zeros_(module.bias)


BACKBONES: dict[str, BackboneSpec] = {
    "mobilenet_v2": BackboneSpec("MobileNetV2Config", "MobileNetV2Model", lambda m: m.conv_1x1.convolution.out_channels,
                                 scratch_init=kaiming_convs),
    "resnet": BackboneSpec("ResNetConfig", "ResNetModel", lambda m: m.config.hidden_sizes[-1]),
    "convnextv2": BackboneSpec("ConvNextV2Config", "ConvNextV2Model", lambda m: m.config.hidden_sizes[-1]),
    "clip_vision": BackboneSpec("CLIPVisionConfig", "CLIPVisionModelWithProjection"),
    "efficientnet_lite": BackboneSpec(EfficientNetLiteConfig, EfficientNetLiteBackbone, lambda m: m.feature_dim),
}


def _spec(backbone: str) -> BackboneSpec:
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; supported: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[backbone]


def backbone_config(backbone: str, kwargs: Mapping[str, Any], *, embed_dim: int, image_size: int):
    """The transformers config of ``backbone`` from config kwargs (or a saved ``to_dict()``).

    Args:
        backbone: a key of :data:`BACKBONES`.
        kwargs: config fields.
        embed_dim: projection size, for backbones that project themselves.
        image_size: set where the config has the field (ViT position embeddings depend on it).

    Returns:
        a ``PretrainedConfig``.
    """
    config = _spec(backbone).classes()[0].from_dict(dict(kwargs))
    if hasattr(config, "image_size"):
        config.image_size = image_size
    if _spec(backbone).projects:
        config.projection_dim = embed_dim
    return config


def from_pretrained_strict(model_class, init: str | Path, config, *, what: str) -> nn.Module:
    """``model_class.from_pretrained(init, config=config)``, failing on missing or misshaped weights.

    transformers only warns about weights it could not find and leaves them random; a student
    that is silently half-initialised is worse than an error.

    Raises:
        ModelNotFoundError: ``init`` does not resolve to a checkpoint.
        ValueError: the checkpoint does not fit the student's architecture.
    """
    try:
        with compat.quiet_progress():
            model, info = model_class.from_pretrained(str(init), config=config, output_loading_info=True)
    except OSError as exc:
        raise ModelNotFoundError(f"{what}: cannot load init checkpoint {str(init)!r}: {exc}") from exc
    except RuntimeError as exc:  # size mismatch between checkpoint and config
        raise ValueError(f"{what}: checkpoint {str(init)!r} does not fit this architecture: {exc}") from exc
    bad = list(info["missing_keys"]) + [str(m) for m in info.get("mismatched_keys", [])]
    if bad:
        raise ValueError(
            f"{what}: checkpoint {str(init)!r} lacks {len(bad)} weights of this architecture "
            f"(first: {', '.join(bad[:5])}); is it the right model family and size?"
        )
    return model


def build_image_tower(backbone: str, config, *, embed_dim: int, init: str | Path | None = None,
                      head_hidden: int | None = None) -> ImageTower:
    """Backbone from ``config`` (random weights, or ``init``'s) plus a projection head.

    Args:
        backbone: a key of :data:`BACKBONES`.
        config: from :func:`backbone_config`.
        embed_dim: output size of the head.
        init: hub id or directory of pretrained backbone weights.
        head_hidden: None for a bias-free linear head, else the hidden size of an MLP head
            (see :func:`clipcore.towers.projection_head`).

    Returns:
        the :class:`ImageTower`.
    """
    spec = _spec(backbone)
    model_class = spec.classes()[1]
    if init is not None:
        model = from_pretrained_strict(model_class, init, config, what=backbone)
    else:
        model = model_class(config)
        if spec.scratch_init is not None:
            spec.scratch_init(model)
    if spec.projects and head_hidden is not None:
        raise ValueError(f"{backbone} projects to the embedding itself: it takes no MLP head")
    head = nn.Identity() if spec.projects else projection_head(spec.feature_dim(model), embed_dim, head_hidden)
    return ImageTower(model, head, family=backbone)
