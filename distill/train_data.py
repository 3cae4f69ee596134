"""Training data: the rows both modes train on; for distillation also the text bank and cached teacher targets."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset

from clipcore.augment import ViewSpec
from clipcore.cache import TeacherTargetCache, cache_key
from clipcore.classnames import classnames_for
from clipcore.data import DataSpec, DataSpecError, ImageDataset, flatten_captions, load_hf_dataset, resolve_columns
from clipcore.distill_loss import LossConfig
from clipcore.dual_encoder import DualEncoder
from clipcore.templates import get_templates
from clipcore.zeroshot import validate_zeroshot_inputs
from distill.config import CacheConfig, ConfigError, DataConfig
from distill.features import embed_texts, teacher_image_rows, teacher_tower_features
from distill.task import TextBank

log = logging.getLogger("distill.train")


class TrainRows(Dataset):
    """The training split's rows as the loop consumes them, in either mode.

    Items are ``{"index", "view", "label"}`` plus, when ``images`` is given, the decoded pixels of
    :class:`ImageDataset` (a mode that trains on cached features alone needs none). An
    undecodable row is replaced by the next decodable one, so every process keeps equal batch
    sizes (the cross-process gather needs them); ``view`` is this epoch's augmented view of the
    row (``cache.views``), recorded so a cached target matches it.

    Args:
        num_rows: rows of the split.
        views: the augmented views and their seed.
        images: the decoded images, or None.
        labels: a label per row, or None to take the image dataset's own label column.
    """

    def __init__(self, num_rows: int, views: ViewSpec, images: ImageDataset | None = None,
                 labels: Sequence[int] | None = None, max_tries: int = 16):
        self.num_rows, self.views, self.images, self.labels, self.max_tries = num_rows, views, images, labels, max_tries
        self.epoch = 0
        if images is not None and views.views > 1:
            images.view = self._view

    def _view(self, image, row: int):
        return self.views.apply(image, row, self.views.view_for(row, self.epoch))

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        if isinstance(index, tuple):  # (epoch, row) from a loader whose workers outlive epochs (distill/feed.py)
            self.epoch, index = index
        item = {"index": int(index)} if self.images is None else self._decoded(int(index))
        if self.labels is not None:
            item["label"] = int(self.labels[item["index"]])
        item["view"] = self.views.view_for(item["index"], self.epoch)
        return item

    def _decoded(self, index: int) -> dict:
        for attempt in range(self.max_tries):
            item = self.images[(index + attempt) % self.num_rows]
            if item["valid"]:
                item["substituted"] = attempt
                return item
        # unusable data, not a failed run: exit 2 (distill/cli.py)
        raise DataSpecError(f"{self.images.name}: rows {index}..{index + self.max_tries - 1} all failed to decode")


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
    """What the loop trains on: the rows, and in distill mode the texts and cached teacher targets."""

    rows: TrainRows
    bank: TextBank | None  # distill mode
    classnames: list[str] | None
    teacher_images: torch.Tensor | None = None  # cached (N, K, D) teacher targets, or None to run the teacher online
    cache_hit: bool | None = None
    class_head: torch.Tensor | None = None  # the teacher's zero-shot head, when built with the data
    teacher_towers: torch.Tensor | None = None  # cached (N, K, F) frozen-tower features (loss.tower_weight)
    student_lowres: torch.Tensor | None = None  # (N,) per-row share of low-resolution student copies (a mixture's)


def check_path(path: str, what: str) -> None:
    looks_local = path.startswith((".", "/", "~")) or os.sep in path and Path(path).parts[0] in ("..", ".")
    if looks_local and not Path(path).expanduser().exists():
        raise FileNotFoundError(
            f"{what}={path} does not exist. The default recipe reads ../shared/data beside the repo; on a "
            "connected machine pass e.g. teacher.name_or_path=openai/clip-vit-base-patch32 data.train=uoft-cs/cifar10"
        )


def check_true_pairs(loss: LossConfig, caption_rows: list[list[int]], where: str) -> None:
    """loss.clip_weight / interactive_weight take each image and one of its own captions as a true pair; a row
    without a caption would be paired with a random class prompt instead, so such rows are refused by count."""
    if not (loss.clip_weight > 0 or loss.interactive_weight > 0):
        return
    bare = sum(1 for caps in caption_rows if not caps)
    if bare:
        raise ConfigError(f"loss.clip_weight / loss.interactive_weight take each image and its own caption as a true "
                          f"pair, but {bare} of {len(caption_rows)} rows of {where} have no caption (they would be "
                          "paired with a random class prompt); train on captioned rows only or set those weights to 0")


def is_mixture(data: DataConfig) -> bool:
    """Image-only training on several sources against a vocabulary (:mod:`distill.mixture`)."""
    return bool(data.vocabulary) or not isinstance(data.train, str)


def build_train_data(data: DataConfig, cache: CacheConfig, loss: LossConfig, teacher: DualEncoder,
                     student: DualEncoder, accelerator, *, seed: int, batch_size: int) -> TrainData:
    """Load the training split, the text bank and (when enabled) the cached teacher targets.

    Args:
        data, cache, loss: the recipe's sections (the loss terms say whether captions are needed).
        seed: the run's seed (training subset, augmented views).
        batch_size: images per teacher forward pass when the targets are built.
    """
    if is_mixture(data):
        raise ValueError("data.train is a list of sources or data.vocabulary is set: use distill.mixture.build_mixture_data")
    check_path(data.train, "data.train")
    spec = DataSpec.from_config(data, seed)
    ds = load_hf_dataset(spec)
    cols = resolve_columns(ds, spec)
    names = classnames_for(ds, cols.label, data.classnames)
    if names:  # duplicate names would fail the post-training export; refuse them before any teacher pass
        names, _ = validate_zeroshot_inputs(names, data.templates)
    templates = list(get_templates(data.templates))
    prompts = [t.format(c) for c in names for t in templates] if names else []
    texts, caption_rows = list(prompts), []
    if cols.captions:
        caps, owner = flatten_captions(ds, cols.captions)
        caption_rows = [[] for _ in range(len(ds))]
        for j, row in enumerate(owner):
            caption_rows[row].append(len(prompts) + j)
        texts += caps
    if (loss.clip_weight > 0 or loss.interactive_weight > 0) and not cols.captions:
        raise ConfigError(
            f"loss.clip_weight / loss.interactive_weight need image-text pairs, but {spec.label} has no caption "
            f"column (columns: {ds.column_names}); set data.caption_column=... or set those weights to 0"
        )
    if cols.captions:
        check_true_pairs(loss, caption_rows, spec.label)
    if not texts:
        raise ValueError(f"{spec.label}: no class names and no captions; set data.classnames=... or data.caption_column")
    cached, hit, teacher_text, towers = None, None, None, None
    views = ViewSpec(views=cache.views, seed=seed)
    if cache.enabled:
        key = cache_key(teacher.fingerprint(), ds._fingerprint, teacher.image_transform.to_json(), cache.views, seed)
        store = TeacherTargetCache(cache.dir, key, accelerator.process_index, accelerator.num_processes,
                                   accelerator.wait_for_everyone)
        rows = teacher_image_rows(teacher, ds, cols, views, cache.dir, seed, batch_size, accelerator)
        targets = store.get_or_build(len(ds), rows, texts, lambda t: embed_texts(teacher, t).numpy())
        cached, hit = torch.from_numpy(targets.images), targets.hit
        teacher_text = torch.from_numpy(targets.texts)
        log.info("teacher-target cache %s: %s", "hit" if hit else "built", targets.path)
        if loss.tower_weight > 0:
            towers = teacher_tower_features(teacher, ds, cols, views, cache.dir, seed, batch_size, accelerator)
    else:
        teacher_text = embed_texts(teacher, texts)
    ids = mask = None
    if student.has_own_text_tower:
        tokens = student.tokenize(texts)
        ids, mask = tokens["input_ids"], tokens.get("attention_mask", torch.ones_like(tokens["input_ids"]))
    prompt_rows = torch.arange(len(prompts)).view(len(names), len(templates)) if names else torch.zeros(0, 0, dtype=torch.long)
    bank = TextBank(texts, ids, mask, teacher_text, prompt_rows, caption_rows)
    transforms = {"student": student.image_transform}
    if cached is None:
        transforms["teacher"] = teacher.image_transform
    rows = TrainRows(len(ds), views, ImageDataset(ds, transforms, cols, name=spec.label))
    return TrainData(rows, bank, names, cached, hit, teacher_towers=towers)
