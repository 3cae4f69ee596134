"""Streamed training data for distillation: WebDataset shards (with or without precomputed
teacher-target sidecars) and ``datasets`` streaming (``data.streaming=true``).

Streams are endless: each process reads its shards pass after pass (reshuffled per pass), so
every process yields the same number of batches and the run ends at ``optim.max_steps``. A
resumed run starts a fresh pass, seeded by its step, rather than the exact continuation.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Iterator

import datasets
import torch
from datasets.distributed import split_dataset_by_node
from torch.utils.data import IterableDataset, get_worker_info

from clipcore.augment import ViewSpec
from clipcore.classnames import classnames_for
from clipcore.data import DataSpec, _is_local, _local_format, _local_split_files, resolve_columns
from clipcore.distill_loss import LossConfig
from clipcore.dual_encoder import DualEncoder
from clipcore.imaging import ImageDecodeError, ImageTransform, decode_image
from clipcore.templates import get_templates
from distill import shards
from distill.config import CacheConfig, ConfigError, DataConfig
from distill.features import embed_texts
from distill.task import TextBank
from distill.train_data import TrainData

log = logging.getLogger("distill.train")


def is_stream(data: DataConfig) -> bool:
    return data.streaming or shards.is_shard_spec(data.train)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class _Stream(IterableDataset):
    """Shared endless-pass and shuffle-buffer logic; subclasses yield one pass of raw items."""

    def __init__(self, transforms: dict[str, ImageTransform], seed: int, buffer: int, rank: int, world: int):
        self.transforms, self.seed, self.buffer, self.rank, self.world = transforms, seed, buffer, rank, world
        self.start = 0

    def set_start(self, step: int) -> None:
        self.start = step

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker()
        rng = random.Random(f"{self.seed}/{self.start}/{self.rank}/{worker}")
        counter = 0
        for p in range(1 << 62):
            for item in shards.shuffled(self.one_pass(p, worker, workers, rng), self.buffer, rng):
                item["index"] = counter  # a running number: streamed rows have no table index
                counter += 1
                yield item

    def one_pass(self, p: int, worker: int, workers: int, rng: random.Random) -> Iterator[dict]:
        raise NotImplementedError

    def pixels(self, image, source: str) -> dict:
        return {f"pixel_values_{k}": torch.from_numpy(t(image)) for k, t in self.transforms.items()}


class ShardStream(_Stream):
    """Samples of WebDataset shards, joined by key with their sidecar targets when ``targets`` is set."""

    def __init__(self, urls: list[str], targets: Path | None, views: ViewSpec, transforms, seed: int, buffer: int,
                 rank: int, world: int):
        super().__init__(transforms, seed, buffer, rank, world)
        self.urls, self.targets, self.views = urls, targets, views

    def one_pass(self, p, worker, workers, rng) -> Iterator[dict]:
        mine = shards.assigned(self.urls, self.rank, self.world, worker, workers)
        if not mine:
            raise shards.ShardError(
                f"{len(self.urls)} shards for {self.world} processes x {workers} DataLoader workers: each shard is "
                "read by one worker of one process, so there must be at least as many shards as workers in all")
        if self.buffer > 1:
            mine = random.Random(f"{self.seed}/pass/{p}/{self.rank}/{worker}").sample(mine, len(mine))
        for url in mine:
            yield from self._shard(url, p)

    def _shard(self, url: str, p: int) -> Iterator[dict]:
        sidecar = shards.read_sidecar(self.targets, shards.shard_name(url)) if self.targets else None
        for sample in shards.read_samples(url):
            key = sample["__key__"]
            try:
                image = decode_image(shards.image_bytes(sample, url), source=f"{url} {key}")
            except ImageDecodeError as exc:
                log.warning("skipping %s", exc)  # precompute skipped it too: the sidecar has no entry
                continue
            item = {"key": key}
            caps = shards.captions_of(sample, url)
            label = shards.label_of(sample)
            if label is not None:
                item["label"] = label
            if sidecar is not None:
                rec = next(sidecar, None)
                if rec is None or rec["key"] != key:
                    raise shards.ShardError(f"{self.targets / shards.shard_name(url)}: expected targets for {key}, "
                                            f"found {rec and rec['key']}; the sidecar does not match {url}")
                if rec["source"] != shards.sample_digest(sample, url):  # never train on another image's targets
                    raise shards.ShardError(
                        f"shard {url}: sample {key} is not the one its targets in {self.targets / shards.shard_name(url)} "
                        "were computed from (the shard was rewritten after precompute); re-run "
                        "`python -m distill.precompute` (it redoes changed shards)")
                view = self.views.view_for(key, p)
                image = shards.apply_view(image, rec["views"][view])
                item["teacher_image"] = torch.from_numpy(rec["teacher"][view].astype("float32"))
                item["view"] = view
            else:
                item["view"] = 0
            # every item carries both keys (None / zeros without a caption) so that batches collate
            j = random.Random(f"{self.seed}/caption/{p}/{key}").randrange(len(caps)) if caps else None
            item["text"] = None if j is None else caps[j]
            if sidecar is not None:
                dim = rec["teacher"].shape[-1]
                item["teacher_text"] = (torch.zeros(dim) if j is None
                                        else torch.from_numpy(rec["captions"][j].astype("float32")))
            item.update(self.pixels(image, f"{url} {key}"))
            yield item


class HFStream(_Stream):
    """``datasets`` streaming: shards split over processes (``split_dataset_by_node``) and workers
    (``datasets`` does that itself), its own shuffle buffer, the teacher online."""

    def __init__(self, ds, columns, transforms, seed: int, buffer: int, rank: int, world: int):
        super().__init__(transforms, seed, 0, rank, world)  # the buffer is datasets' own (below)
        self.columns = columns
        ds = split_dataset_by_node(ds, rank=rank, world_size=world)
        self.ds = ds.shuffle(seed=seed, buffer_size=buffer) if buffer > 1 else ds

    def one_pass(self, p, worker, workers, rng) -> Iterator[dict]:
        self.ds.set_epoch(p + self.start)
        for n, row in enumerate(self.ds):
            try:
                image = decode_image(row[self.columns.image], source=f"streamed row {n}")
            except ImageDecodeError as exc:
                log.warning("skipping %s", exc)
                continue
            item = {"view": 0}
            if self.columns.label and row[self.columns.label] is not None:
                item["label"] = int(row[self.columns.label])
            caps = []
            if self.columns.captions:
                value = row[self.columns.captions]
                caps = [c for c in ([] if value is None else [value] if isinstance(value, str) else value) if c.strip()]
            item["text"] = caps[rng.randrange(len(caps))] if caps else None
            item.update(self.pixels(image, f"streamed row {n}"))
            yield item


def _check(d: DataConfig, cache: CacheConfig) -> None:
    if not d.eval:
        raise ConfigError(f"data.train={d.train} is streamed; set data.eval to a map-style dataset to evaluate on")
    if d.train_limit:
        raise ConfigError(f"data.train_limit={d.train_limit} takes a subset of map-style data; a stream has no "
                          "length: bound the run with optim.max_steps or list fewer shards")
    if d.streaming and shards.is_shard_spec(d.train):
        raise ConfigError("data.streaming=true is for `datasets` sources; WebDataset shards stream anyway")
    if d.streaming and cache.enabled:
        raise ConfigError("data.streaming=true runs the teacher online (rows have no stable key for cached "
                          "targets): set cache.enabled=false, or write WebDataset shards and precompute their "
                          "targets with `python -m distill.precompute`")


def _bank(data: DataConfig, teacher: DualEncoder, student: DualEncoder, names: list[str] | None) -> TextBank:
    templates = list(get_templates(data.templates))
    prompts = [t.format(c) for c in names for t in templates] if names else []
    emb = embed_texts(teacher, prompts) if prompts else torch.zeros(0, teacher.embed_dim)
    ids = mask = None
    if student.has_own_text_tower and prompts:
        tokens = student.tokenize(prompts)
        ids, mask = tokens["input_ids"], tokens.get("attention_mask", torch.ones_like(tokens["input_ids"]))
    rows = torch.arange(len(prompts)).view(len(names), len(templates)) if names else torch.zeros(0, 0, dtype=torch.long)
    return TextBank(prompts, ids, mask, emb, rows, [])


def _classnames(data: DataConfig, ds=None, label_column=None) -> list[str] | None:
    if ds is None and not data.classnames:
        return None
    return classnames_for(ds, label_column, data.classnames)


def build_stream_data(data: DataConfig, cache: CacheConfig, loss: LossConfig, teacher: DualEncoder,
                      student: DualEncoder, accelerator, *, seed: int, batch_size: int) -> TrainData:
    """:class:`distill.train_data.TrainData` whose rows are an endless stream (the arguments of
    :func:`distill.train_data.build_train_data`; ``loss`` and ``batch_size`` are unused here)."""
    _check(data, cache)
    rank, world = accelerator.process_index, accelerator.num_processes
    transforms = {"student": student.image_transform}
    if shards.is_shard_spec(data.train):
        urls = shards.expand_urls(data.train)
        targets = Path(data.targets) if data.targets else None
        if targets is not None:
            meta = shards.read_meta(targets)
            want = {"teacher": teacher.fingerprint(), "views": cache.views, "seed": seed}
            bad = [k for k, v in want.items() if meta.get(k) != v]
            if bad:
                raise ConfigError(f"data.targets={targets} was precomputed with other {', '.join(bad)} "
                                  f"({', '.join(f'{k}={meta.get(k)!r}' for k in bad)}); run precompute again")
            views = ViewSpec(views=meta["views"], seed=meta["seed"])
        else:
            if cache.views > 1:
                raise ConfigError("cache.views > 1 on shards needs precomputed targets (data.targets)")
            views = ViewSpec(views=1, seed=seed)
            transforms["teacher"] = teacher.image_transform
        shards.check_shards(urls, targets)  # now, not when the stream reaches a bad shard after checkpoints
        if targets is not None:
            shards.check_sources(urls, targets)  # sidecars of a rewritten shard: stale targets
        names = _classnames(data)
        stream = ShardStream(urls, targets, views, transforms, seed, data.shuffle_buffer, rank, world)
        log.info("streaming %d WebDataset shards (%s), %s", len(urls), data.train,
                 f"teacher targets from {targets}" if targets else "teacher online")
    else:
        spec = DataSpec(path=data.train, split=data.train_split, image_column=data.image_column,
                        label_column=data.label_column, caption_column=data.caption_column)
        if _is_local(spec.path):
            fmt = _local_format(Path(spec.path))
            files = _local_split_files(Path(spec.path), fmt)
            if spec.split not in files:
                raise ConfigError(f"data.train={spec.path} has no split {spec.split!r}; splits: {sorted(files)}")
            ds = datasets.load_dataset(fmt, data_files={spec.split: files[spec.split]}, split=spec.split, streaming=True)
        else:
            ds = datasets.load_dataset(spec.path, split=spec.split, streaming=True)
        cols = resolve_columns(ds, spec)
        ds = ds.cast_column(cols.image, datasets.Image(decode=False))
        names = _classnames(data, ds, cols.label)
        transforms["teacher"] = teacher.image_transform
        stream = HFStream(ds, cols, transforms, seed, data.shuffle_buffer, rank, world)
        log.info("streaming %s[%s] with datasets (%d shards), teacher online", spec.path, spec.split, ds.n_shards)
    if not names:
        log.info("no class names (data.classnames): every streamed sample must carry a caption")
    bank = _bank(data, teacher, student, names)
    return TrainData(stream, bank, names, None, None)
