"""Contrastive fine-tuning (``mode: contrastive``): the classic "fine-tune CLIP on your data".

A dual encoder trains with the CLIP loss and no teacher, on image-caption data or on labelled
data turned into captions (templates x class-name synonyms). Either tower can be locked
(LiT-style: a frozen tower, a trained projection head) or partly unfrozen. A fully frozen tower
is run once: its features are cached on disk (like teacher targets) and each step runs only the
heads, which is what makes aligning pretrained towers on a CPU practical.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clipcore.augment import ViewSpec
from clipcore.classnames import label_names_or_none, load_classname_source, synonyms
from clipcore.contrastive_loss import MultiPositiveClipLoss, SoftTargetKLLoss
from clipcore.data import DataSpec, ImageDataset, flatten_captions, load_hf_dataset, resolve_columns
from clipcore.dual_encoder import DualEncoder, HFDualEncoder, TowerSplit, freeze
from clipcore.loading import load_dual_encoder
from clipcore.losses import clamp_log_scale_, logit_scale, total_loss
from clipcore.templates import get_templates
from clipcore.towers import TowerDualEncoder, build_reference_dual_encoder
from clipcore.zeroshot import validate_labels
from distill.config import ConfigError, ContrastiveConfig, DataConfig, TrainConfig
from distill.features import cached_image_tower_features, cached_text_tower_features
from distill.train_data import TrainRows

log = logging.getLogger("distill.train")


# --------------------------------------------------------------------------------- tower split


def split_towers(model: DualEncoder) -> TowerSplit:
    """The tower/head split of a CLIPModel or a tower dual encoder; other models cannot be locked."""
    if isinstance(model, TowerDualEncoder):
        return model.tower_split()
    if isinstance(model, HFDualEncoder) and hasattr(model.model, "visual_projection"):
        m = model.model
        return TowerSplit(
            image_tower=m.vision_model,
            image_tower_fn=lambda px: m.vision_model(pixel_values=px).pooler_output,
            image_head=m.visual_projection,
            image_blocks=[*m.vision_model.encoder.layers, m.vision_model.post_layernorm],
            text_tower=m.text_model,
            text_tower_fn=lambda ids, mask: m.text_model(input_ids=ids, attention_mask=mask).pooler_output,
            text_head=m.text_projection,
            text_blocks=[*m.text_model.encoder.layers, m.text_model.final_layer_norm],
        )
    raise ConfigError(f"{type(model).__name__} has no tower/head split; locking towers needs a CLIPModel or towers")


def apply_freezing(split: TowerSplit, cfg) -> tuple[bool, bool]:
    """Freeze towers as configured; returns (image tower fully frozen, text tower fully frozen)."""
    result = []
    for tower, blocks, frozen, unfreeze in (
        (split.image_tower, split.image_blocks, cfg.freeze_image, cfg.unfreeze_image_blocks),
        (split.text_tower, split.text_blocks, cfg.freeze_text, cfg.unfreeze_text_layers),
    ):
        if not frozen:
            result.append(False)
            continue
        freeze(tower)
        if unfreeze > 0:
            for block in list(blocks)[-unfreeze:]:
                block.requires_grad_(True)
        result.append(unfreeze == 0)
    return result[0], result[1]


# ----------------------------------------------------------------------------------- the texts


@dataclass
class ContrastiveTexts:
    """Every text the run trains on, with which rows each image may draw from."""

    texts: list[str]
    class_rows: list[list[int]]  # class -> rows of its prompts (label data)
    caption_rows: list[list[int]]  # image -> rows of its captions (caption data)
    imagenet_rows: list[int]  # rows of the ImageNet-1k class prompts (soft targets), or []


def _class_synonyms(ds, label_column: str | None, spec: str | None) -> list[list[str]] | None:
    labels = label_names_or_none(ds, label_column)
    source = load_classname_source(spec) if spec else None
    if source is None:
        return [[n] for n in labels] if labels else None
    if isinstance(source, dict):
        if labels is None:
            raise ConfigError("data.classnames is a mapping but the label column is not a ClassLabel")
        missing = [n for n in labels if n not in source]
        if missing:
            raise ConfigError(f"data.classnames lacks {len(missing)} labels, e.g. {missing[:5]}")
        return [synonyms(source[n]) for n in labels]
    return [synonyms(n) for n in source]


def build_texts(data: DataConfig, c: ContrastiveConfig, ds, cols) -> tuple[ContrastiveTexts, list[str] | None]:
    """Captions, or prompts from templates x synonyms per class; returns the texts and class names."""
    texts: list[str] = []
    class_rows: list[list[int]] = []
    caption_rows: list[list[int]] = []
    names_syn = _class_synonyms(ds, cols.label, data.classnames)
    if cols.captions:
        caps, owner = flatten_captions(ds, cols.captions)
        caption_rows = [[] for _ in range(len(ds))]
        for j, row in enumerate(owner):
            caption_rows[row].append(j)
        texts += caps
    elif names_syn:
        for syns in names_syn:
            rows = [len(texts) + i for i in range(len(syns) * len(get_templates(data.templates)))]
            texts += [t.format(s) for s in syns for t in get_templates(data.templates)]
            class_rows.append(rows)
    else:
        raise ConfigError("contrastive training needs a caption column or class labels (data.classnames)")
    imagenet_rows: list[int] = []
    if c.imagenet_kl_weight > 0:
        path = Path(c.imagenet_classnames)
        if not path.is_file():
            raise FileNotFoundError(f"contrastive.imagenet_classnames={path} does not exist")
        names = [synonyms(v)[0] for v in json.loads(path.read_text()).values()]
        imagenet_rows = list(range(len(texts), len(texts) + len(names)))
        texts += [f"a photo of a {n}." for n in names]
    classnames = [s[0] for s in names_syn] if names_syn else None
    return ContrastiveTexts(texts, class_rows, caption_rows, imagenet_rows), classnames


# --------------------------------------------------------------------------------------- task


class ContrastiveTask(nn.Module):
    """CLIP loss (same-class positives) plus optional ImageNet soft targets, on cached or live towers."""

    def __init__(self, model: DualEncoder, split: TowerSplit, texts: ContrastiveTexts, cfg: ContrastiveConfig,
                 image_cache: torch.Tensor | None, text_cache: torch.Tensor | None, text_ids, text_mask,
                 image_feat_dim: int | None = None):
        super().__init__()
        self.model, self.split, self.texts, self.cfg = model, split, texts, cfg
        self.image_cache, self.text_cache = image_cache, text_cache
        self.image_feat_dim = image_feat_dim  # cached image rows: tower features, then the ImageNet logits
        self.text_ids, self.text_mask = text_ids, text_mask
        self.clip_loss = MultiPositiveClipLoss(1.0)
        self.imagenet_loss = SoftTargetKLLoss(cfg.imagenet_kl_weight, cfg.imagenet_temperature, name="imagenet_kl")

    def train(self, mode: bool = True) -> "ContrastiveTask":
        super().train(mode)
        for tower, frozen in ((self.split.image_tower, self.image_cache is not None),
                              (self.split.text_tower, self.text_cache is not None)):
            if frozen:
                tower.eval()  # a cached (frozen) tower keeps BatchNorm/dropout in inference mode
        for tower in (self.split.image_tower, self.split.text_tower):
            for module in tower.modules():  # a frozen BatchNorm keeps its running statistics too
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                        p.requires_grad for p in module.parameters()):
                    module.eval()
        return self

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        clamp_log_scale_(self.model.log_logit_scale)

    def export_student(self) -> DualEncoder:
        return self.model

    def parity_reference(self) -> DualEncoder:
        """No teacher here: exported variants are checked against the trained model itself."""
        return self.model

    def agreement_reference(self) -> DualEncoder | None:
        return None

    def _text_rows(self, batch: dict, gen: torch.Generator) -> torch.Tensor:
        rows = []
        for idx, label in zip(batch["index"].tolist(), batch["label"].tolist()):
            pool = self.texts.caption_rows[idx] if self.texts.caption_rows else self.texts.class_rows[label]
            rows.append(pool[int(torch.randint(len(pool), (1,), generator=gen))])
        return torch.tensor(rows, dtype=torch.long)

    def _encode_texts(self, rows: torch.Tensor, device) -> torch.Tensor:
        if self.text_cache is not None:
            return self.split.text_head(self.text_cache[rows].to(device))
        feats = self.split.text_tower_fn(self.text_ids[rows].to(device), self.text_mask[rows].to(device))
        return self.split.text_head(feats)

    def forward(self, batch: dict, step: int, seed: int = 0) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        device = batch["index"].device
        extra = None
        if self.image_cache is not None:
            cached = self.image_cache[batch["index"].cpu(), batch["view"].cpu()].to(device)
            feats = cached[:, : self.image_feat_dim]
            extra = cached[:, self.image_feat_dim :]
        else:
            feats = self.split.image_tower_fn(batch["pixel_values_student"])
        img = self.split.image_head(feats)
        txt = self._encode_texts(self._text_rows(batch, gen), device)
        groups = batch["label"] if (self.cfg.label_positives and not self.texts.caption_rows) else None
        out = self.clip_loss(img, txt, self.model.log_logit_scale, groups)
        if self.imagenet_loss.weight > 0:
            out.update(self.imagenet_loss(*self._imagenet_logits(img, extra, device, batch)))
        out["loss"] = total_loss(out)
        return out

    def _imagenet_logits(self, img: torch.Tensor, logits: torch.Tensor | None, device, batch):
        """(zero-shot logits over the 1000 ImageNet class prompts, the image tower's own ImageNet-1k logits)."""
        if logits is None or logits.shape[1] == 0:
            logits = self.model.imagenet_logits(batch["pixel_values_student"])
        rows = torch.tensor(self.texts.imagenet_rows, dtype=torch.long)
        classes = F.normalize(self._encode_texts(rows, device).float(), dim=-1)
        zero_shot = logit_scale(self.model.log_logit_scale) * F.normalize(img.float(), dim=-1) @ classes.t()
        return zero_shot, logits


# -------------------------------------------------------------------------------------- build


def load_trainable(c: ContrastiveConfig, init_logit_scale: float, device) -> DualEncoder:
    """The dual encoder to fine-tune: ``reference:lite0`` builds from the pretrained wheels."""
    spec = c.model
    if spec.startswith("reference:"):
        return build_reference_dual_encoder(image_variant=spec.split(":", 1)[1], head=c.head,
                                            embed_dim=c.embed_dim, image_size=c.image_size,
                                            init_logit_scale=init_logit_scale).to(device)
    return load_dual_encoder(spec, device=device).train()


def build_contrastive(cfg: TrainConfig, accelerator):
    """Model, task and training rows for ``mode: contrastive``. Returns (task, rows, classnames)."""
    c = cfg.contrastive
    model = load_trainable(c, cfg.optim.init_logit_scale, accelerator.device)
    split = split_towers(model)
    image_frozen, text_frozen = apply_freezing(split, c)
    spec = DataSpec.from_config(cfg.data, cfg.seed)
    ds = load_hf_dataset(spec)
    cols = resolve_columns(ds, spec)
    texts, classnames = build_texts(cfg.data, c, ds, cols)
    labels = list(ds[cols.label]) if cols.label else [-1] * len(ds)
    if texts.class_rows:  # each label picks its class's prompts: checked before any tower pass
        if not cols.label:
            raise ConfigError(f"{spec.label}: class-name prompts need a label column; the dataset has none "
                              f"(columns {ds.column_names}); set data.label_column")
        validate_labels(labels, len(texts.class_rows), source=spec.label)
    views = ViewSpec(views=cfg.cache.views, seed=cfg.seed)
    if c.imagenet_kl_weight > 0 and not isinstance(model, TowerDualEncoder):
        raise ConfigError("contrastive.imagenet_kl_weight needs an image tower with ImageNet logits (reference:*)")
    image_cache = text_cache = feat_dim = None
    if image_frozen:
        image_cache, feat_dim = cached_image_tower_features(model, split, ds, cols, views, cfg.cache.dir, cfg.seed,
                                                            cfg.optim.batch_size, accelerator)
    if text_frozen:
        text_cache = cached_text_tower_features(model, split, texts.texts, cfg.cache.dir, accelerator)
    tok = model.tokenize(texts.texts) if text_cache is None else {}
    task = ContrastiveTask(model, split, texts, c, image_cache, text_cache, tok.get("input_ids"),
                           tok.get("attention_mask"), image_feat_dim=feat_dim)
    images = None if image_frozen else ImageDataset(ds, {"student": model.image_transform}, cols, name=spec.label)
    rows = TrainRows(len(ds), views, images, labels)
    return task, rows, classnames
