"""Batches for the training loop, and their trip to the device.

Three sources, chosen once per run by :func:`make_feeder`:

* a pre-decoded uint8 store (:mod:`distill.pixel_store`) for map-style data whose images at the
  student's size fit in ``data.pixel_store_max_gb`` and need no teacher pixels (cached targets,
  one view): a batch is an index lookup in the main process;
* DataLoader workers (``data.num_workers``, ``data.prefetch_factor``) that decode and augment off
  the main process; one DataLoader lives for the whole run (persistent workers): its batch sampler
  carries the epoch with every row, so changing epoch needs no new workers;
* a stream (WebDataset shards or ``datasets`` streaming, :mod:`distill.shards`) read by one
  DataLoader for the whole run.

Host memory is pinned and copies are non-blocking when the device is a GPU; uint8 pixels are
normalised on the device.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

from clipcore.data import collate
from distill.train_data import TrainData, TrainRows, epoch_batches

log = logging.getLogger("distill.train")
UINT8_KEY = "pixels_uint8_student"


class EpochBatchSampler(Sampler):
    """Yields this epoch's batches as lists of ``(epoch, row)``; :meth:`set` switches epoch in place,
    so a DataLoader with persistent workers survives across epochs."""

    def __init__(self):
        self.batches: list[list[int]] = []
        self.epoch = 0

    def set(self, batches: list[list[int]], epoch: int) -> None:
        self.batches, self.epoch = batches, epoch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.batches:
            yield [(self.epoch, i) for i in batch]

    def __len__(self) -> int:
        return len(self.batches)


class Feeder:
    """``epoch(state, accum)`` -> (batches of this epoch from ``state``, usable batches in the epoch);
    ``to_device(batch)`` -> the batch on the device with pixels normalised and cached targets looked up."""

    def __init__(self, cfg, data: TrainData, accelerator, store=None):
        self.cfg, self.data, self.store = cfg, data, store
        self.device = accelerator.device
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.pin = self.device.type == "cuda"
        cached = data.teacher_images
        # the whole (N, K, D) target table on the GPU once, rather than a host gather per step
        self.cached = cached.to(self.device) if cached is not None and self.pin else cached
        towers = data.teacher_towers
        self.towers = towers.to(self.device) if towers is not None and self.pin else towers
        self.sampler = EpochBatchSampler()
        self.loader: DataLoader | None = None
        self.stream: Iterator | None = None

    # ------------------------------------------------------------------------------ batches

    def epoch(self, state: dict, accum: int) -> tuple[Iterable[dict], int]:
        if isinstance(self.data.rows, IterableDataset):
            return self._stream(state), 1 << 62  # an endless stream: the loop ends at max_steps
        batches = epoch_batches(self._num_rows(), self.cfg.optim.batch_size, self.rank, self.world,
                                self.cfg.batch_seed, state["epoch"])
        usable = len(batches) - len(batches) % accum  # an epoch ends on an optimiser-step boundary
        if usable == 0:
            raise ValueError(f"an epoch has {len(batches)} batches < optim.grad_accum={accum}")
        todo = batches[state["batch"]:usable]
        if self.store is not None:
            return (self._store_batch(b) for b in todo), usable
        return self._map_loader(todo, state["epoch"]), usable

    def _num_rows(self) -> int:
        return len(self.store) if self.store is not None else len(self.data.rows)

    def _store_batch(self, rows: list[int]) -> dict:
        index = self.store.rows(torch.tensor(rows, dtype=torch.long))
        pixels = self.store.gather(index)
        return {UINT8_KEY: pixels.pin_memory() if self.pin else pixels, "index": index,
                "view": torch.zeros_like(index), "substituted": (index - torch.tensor(rows)) % len(self.store),
                "num_failed": 0, "failed_index": []}

    def _map_loader(self, todo: list[list[int]], epoch: int) -> Iterable[dict]:
        rows, workers = self.data.rows, self.cfg.data.num_workers
        self.sampler.set(todo, epoch)
        if self.loader is None:
            self.loader = DataLoader(rows, batch_sampler=self.sampler, collate_fn=collate, num_workers=workers,
                                     pin_memory=self.pin, **self._worker_kwargs(workers))
        return self.loader

    def _worker_kwargs(self, workers: int) -> dict:
        if workers == 0:
            return {}
        return {"persistent_workers": True, "prefetch_factor": self.cfg.data.prefetch_factor}

    def _stream(self, state: dict) -> Iterator[dict]:
        if self.stream is None:
            # a resumed stream starts a fresh shuffled pass (seeded by the step), not the exact continuation
            self.data.rows.set_start(state["step"])
            workers = self.cfg.data.num_workers
            loader = DataLoader(self.data.rows, batch_size=self.cfg.optim.batch_size, collate_fn=collate,
                                num_workers=workers, pin_memory=self.pin, drop_last=True,
                                **self._worker_kwargs(workers))
            self.stream = iter(loader)
        return self.stream

    # ------------------------------------------------------------------------------- device

    def to_device(self, batch: dict) -> dict:
        out = {k: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
               for k, v in batch.items()}
        if UINT8_KEY in out:
            out["pixel_values_student"] = self.store.normalise(out.pop(UINT8_KEY))
        if self.cached is not None and "teacher_image" not in out:
            out["teacher_image"] = self._rows_of(self.cached, batch)
        if self.towers is not None:
            out["teacher_tower"] = self._rows_of(self.towers, batch)
        return out

    def _rows_of(self, table: torch.Tensor, batch: dict) -> torch.Tensor:
        """The batch's rows of an (N, K, F) table, each at its view, on the device."""
        where = table.device
        return table[batch["index"].to(where), batch["view"].to(where)].to(self.device)

    def close(self) -> None:
        self.loader = self.stream = None


def use_pixel_store(cfg, data: TrainData, accelerator) -> bool:
    """``data.pixel_store``: true / false, or null to choose by size (see the module docstring)."""
    rows = data.rows
    if cfg.mode != "distill" or not isinstance(rows, TrainRows) or rows.images is None:
        return _forced_off(cfg, "it holds images for mode=distill on map-style data only")
    images = rows.images
    reasons = []
    if data.teacher_images is None:
        reasons.append("the teacher runs online and needs its own pixels (cache.enabled=false)")
    if rows.views.views > 1:
        reasons.append(f"cache.views={rows.views.views} crops each row anew per epoch")
    transform = images.transforms["student"]
    from distill.pixel_store import store_bytes

    size = store_bytes(len(rows), transform) / 2**30
    if cfg.data.pixel_store is None and size > cfg.data.pixel_store_max_gb:
        reasons.append(f"it would take {size:.1f} GB > data.pixel_store_max_gb={cfg.data.pixel_store_max_gb}")
    if reasons:
        return _forced_off(cfg, "; ".join(reasons))
    return cfg.data.pixel_store is not False


def _forced_off(cfg, why: str) -> bool:
    if cfg.data.pixel_store:
        from distill.config import ConfigError

        raise ConfigError(f"data.pixel_store=true cannot be used: {why}")
    return False


def make_feeder(cfg, data: TrainData, accelerator) -> Feeder:
    store = None
    if use_pixel_store(cfg, data, accelerator):
        from distill import pixel_store

        images = data.rows.images
        store = pixel_store.get_or_build(images.ds, images.columns.image, images.transforms["student"],
                                         Path(cfg.cache.dir).parent / "pixel-store", images.name, accelerator,
                                         cfg.data.num_workers, view=images.view)
    elif getattr(data.rows, "images", None) is not None and cfg.data.num_workers == 0 and accelerator.is_main_process:
        log.info("decoding images in the main process; data.num_workers=N moves it to N worker processes")
    return Feeder(cfg, data, accelerator, store)

