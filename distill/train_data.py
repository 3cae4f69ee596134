"""Training data for distillation: images with their views, the text bank, cached teacher targets."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from distill.config import ConfigError, TrainConfig
from distill.core.augment import ViewSpec
from distill.core.cache import TeacherTargetCache, cache_key
from distill.core.classnames import classnames_for
from distill.core.data import DataSpec, ImageDataset, collate, flatten_captions, load_hf_dataset, resolve_columns
from distill.core.dual_encoder import DualEncoder
from distill.core.templates import get_templates
from distill.task import TextBank

log = logging.getLogger("distill.train")


class TrainImages(Dataset):
    """An :class:`ImageDataset` for training.

    It replaces an undecodable row by the next decodable one, so every process keeps equal batch
    sizes (the cross-process gather needs them), and it applies this epoch's augmented view of
    each row (``cache.views``), recording the view so the cached teacher target matches it.
    """

    def __init__(self, base: ImageDataset, views: ViewSpec, max_tries: int = 16):
        self.base, self.views, self.max_tries = base, views, max_tries
        self.epoch = 0
        if views.views > 1:
            base.view = self._view

    def _view(self, image, row: int):
        return self.views.apply(image, row, self.views.view_for(row, self.epoch))

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        for attempt in range(self.max_tries):
            item = self.base[(int(index) + attempt) % len(self.base)]
            if item["valid"]:
                item["substituted"] = attempt
                item["view"] = self.views.view_for(item["index"], self.epoch)
                return item
        raise RuntimeError(f"{self.base.name}: rows {index}..{index + self.max_tries - 1} all failed to decode")


def epoch_batches(num_rows: int, batch_size: int, rank: int, world: int, seed: int, epoch: int) -> list[list[int]]:
    """This process's batches for ``epoch``: a seeded permutation cut into equal global batches.

    Determined by (seed, epoch) alone, so a resumed run sees exactly the batches it would have.
    """
    per_step = batch_size * world
    if num_rows < per_step:
        raise ValueError(f"{num_rows} training images < batch_size x processes = {per_step}")
    perm = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + 7919 * epoch))
    usable = num_rows - num_rows % per_step
    return perm[:usable].view(-1, world, batch_size)[:, rank].tolist()


@dataclass
class TrainData:
    images: TrainImages
    bank: TextBank
    classnames: list[str] | None
    teacher_images: torch.Tensor | None  # cached (N, K, D) teacher targets, or None to run the teacher online
    cache_hit: bool | None


def check_path(path: str, what: str) -> None:
    looks_local = path.startswith((".", "/", "~")) or os.sep in path and Path(path).parts[0] in ("..", ".")
    if looks_local and not Path(path).expanduser().exists():
        raise FileNotFoundError(
            f"{what}={path} does not exist. The default recipe reads ../shared/data beside the repo; on a "
            "connected machine pass e.g. teacher.name_or_path=openai/clip-vit-base-patch32 data.train=uoft-cs/cifar10"
        )


def _teacher_rows(teacher: DualEncoder, ds, columns, views: ViewSpec, batch_size: int, device) -> callable:
    """``(start, end) -> (rows, K, D)`` teacher embeddings of every view of those rows."""

    @torch.no_grad()  # here, not on the outer function: this closure runs later, outside it
    def embed(start: int, end: int):
        out = torch.zeros(end - start, views.views, teacher.embed_dim)
        for k in range(views.views):
            view = (lambda image, i, k=k: views.apply(image, start + i, k)) if k else None
            sub = ImageDataset(ds.select(range(start, end)), {"teacher": teacher.image_transform}, columns, view=view)
            batches = DataLoader(sub, batch_size=batch_size, collate_fn=collate)
            for batch in tqdm(batches, desc=f"teacher targets, view {k + 1}/{views.views}", unit="batch",
                              mininterval=10, leave=False):
                if batch["index"].numel():
                    out[batch["index"], k] = teacher.encode_image(batch["pixel_values_teacher"].to(device)).cpu()
        return out.numpy()

    return embed


def _teacher_rows_from_tower_features(teacher: DualEncoder, ds, columns, views: ViewSpec, cfg: TrainConfig,
                                      accelerator) -> callable:
    """Like :func:`_teacher_rows` for a teacher built on frozen towers (``tower_split``): its targets
    are its heads applied to the cached tower features, which the run that aligned it on the same
    images has usually computed already (see ``cached_image_tower_features``)."""
    from distill.contrastive import cached_image_tower_features

    split = teacher.tower_split()

    @torch.no_grad()
    def embed(start: int, end: int):
        feats, dim = cached_image_tower_features(teacher, split, ds, columns, views, cfg.cache.dir, cfg.seed,
                                                 cfg.optim.batch_size, accelerator)
        head = split.image_head
        x = feats[start:end, :, :dim].flatten(0, 1).to(accelerator.device, next(head.parameters()).dtype)
        return F.normalize(head(x).float(), dim=-1).view(end - start, views.views, -1).cpu().numpy()

    return embed


@torch.no_grad()
def _embed_texts(model: DualEncoder, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    return torch.cat([model.encode_text(list(texts[i : i + batch_size])).cpu() for i in range(0, len(texts), batch_size)])


def build_train_data(cfg: TrainConfig, teacher: DualEncoder, student: DualEncoder, accelerator) -> TrainData:
    """Load the training split, the text bank and (when enabled) the cached teacher targets."""
    check_path(cfg.data.train, "data.train")
    spec = DataSpec(path=cfg.data.train, split=cfg.data.train_split, image_column=cfg.data.image_column,
                    label_column=cfg.data.label_column, caption_column=cfg.data.caption_column,
                    limit=cfg.data.train_limit, shuffle_seed=cfg.seed if cfg.data.train_limit else None)
    ds = load_hf_dataset(spec)
    cols = resolve_columns(ds, spec)
    names = classnames_for(ds, cols.label, cfg.data.classnames)
    templates = list(get_templates(cfg.data.templates))
    prompts = [t.format(c) for c in names for t in templates] if names else []
    texts, caption_rows = list(prompts), []
    if cols.captions:
        caps, owner = flatten_captions(ds, cols.captions)
        caption_rows = [[] for _ in range(len(ds))]
        for j, row in enumerate(owner):
            caption_rows[row].append(len(prompts) + j)
        texts += caps
    if (cfg.loss.clip_weight > 0 or cfg.loss.interactive_weight > 0) and not cols.captions:
        raise ConfigError(
            f"loss.clip_weight / loss.interactive_weight need image-text pairs, but {spec.label} has no caption "
            f"column (columns: {ds.column_names}); set data.caption_column=... or set those weights to 0"
        )
    if not texts:
        raise ValueError(f"{spec.label}: no class names and no captions; set data.classnames=... or data.caption_column")
    cached, hit, teacher_text = None, None, None
    views = ViewSpec(views=cfg.cache.views, seed=cfg.seed)
    if cfg.cache.enabled:
        key = cache_key(teacher.fingerprint(), ds._fingerprint, teacher.image_transform.to_json(), cfg.cache.views, cfg.seed)
        store = TeacherTargetCache(cfg.cache.dir, key, accelerator.process_index, accelerator.num_processes,
                                   accelerator.wait_for_everyone)
        rows = (_teacher_rows_from_tower_features(teacher, ds, cols, views, cfg, accelerator)
                if hasattr(teacher, "tower_split") else
                _teacher_rows(teacher, ds, cols, views, cfg.optim.batch_size, accelerator.device))
        targets = store.get_or_build(len(ds), rows,
                                     texts, lambda t: _embed_texts(teacher, t).numpy())
        cached, hit = torch.from_numpy(targets.images), targets.hit
        teacher_text = torch.from_numpy(targets.texts)
        log.info("teacher-target cache %s: %s", "hit" if hit else "built", targets.path)
    else:
        teacher_text = _embed_texts(teacher, texts)
    ids = mask = None
    if _student_has_text(student):
        tokens = student.tokenize(texts)
        ids, mask = tokens["input_ids"], tokens.get("attention_mask", torch.ones_like(tokens["input_ids"]))
    prompt_rows = torch.arange(len(prompts)).view(len(names), len(templates)) if names else torch.zeros(0, 0, dtype=torch.long)
    bank = TextBank(texts, ids, mask, teacher_text, prompt_rows, caption_rows)
    transforms = {"student": student.image_transform}
    if cached is None:
        transforms["teacher"] = teacher.image_transform
    images = TrainImages(ImageDataset(ds, transforms, cols, name=spec.label), views)
    return TrainData(images, bank, names, cached, hit)


def _student_has_text(student: DualEncoder) -> bool:
    from students.image_only import FrozenTextStudent

    return not isinstance(student, FrozenTextStudent)
