"""On-disk cache of teacher targets: image embeddings (K views per image) and text embeddings.

Layout of one cache entry ``<root>/<key>/``:
    meta.json                      written last, atomically: its presence means "complete"
    images-r{rank}.npy             float16 (rows, K, D) for the rows ``meta["shards"]`` assigns to rank
    texts.npy                      float16 (M, D) for the texts listed in meta["texts_sha"]

The key hashes (teacher fingerprint, dataset fingerprint, teacher preprocessing, views, seed),
so a change to any of them is a miss. Every process writes only its own shard file, through a
temporary name and ``os.replace``; the main process writes ``meta.json`` only after a barrier,
so a half-written cache is never read: without ``meta.json`` the entry is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

META = "meta.json"


def cache_key(teacher_fp: str, dataset_fp: str, preprocess: str, views: int, seed: int) -> str:
    blob = json.dumps(
        {"teacher": teacher_fp, "data": dataset_fp, "pre": preprocess, "views": views, "seed": seed}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def texts_sha(texts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode()).hexdigest()[:20]


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def shard_rows(num_rows: int, world: int, rank: int) -> tuple[int, int]:
    """Contiguous [start, end) rows of ``rank``; shards differ in size by at most one row."""
    base, extra = divmod(num_rows, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@dataclass
class TeacherTargets:
    """Loaded cache entry: ``images[row, view]`` and ``texts[j]`` (float32 views of the float16 files)."""

    images: np.ndarray  # (N, K, D)
    texts: np.ndarray | None  # (M, D)
    path: Path
    hit: bool


class TeacherTargetCache:
    """Build-or-load one cache entry. ``barrier`` synchronises processes (``accelerator.wait_for_everyone``)."""

    def __init__(self, root: str | Path, key: str, rank: int = 0, world: int = 1,
                 barrier: Callable[[], None] = lambda: None):
        self.path = Path(root) / key
        self.rank, self.world, self.barrier = rank, world, barrier

    def complete(self) -> bool:
        return (self.path / META).is_file()

    def load(self) -> TeacherTargets:
        meta = json.loads((self.path / META).read_text())
        parts = [np.load(self.path / f"images-r{r}.npy", mmap_mode="r") for r in range(meta["world"])]
        images = np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 1, 1), np.float32)
        texts = np.load(self.path / "texts.npy").astype(np.float32) if meta.get("num_texts") else None
        if images.shape[0] != meta["num_rows"]:
            raise RuntimeError(f"{self.path}: cache holds {images.shape[0]} rows, meta says {meta['num_rows']}")
        return TeacherTargets(images=images, texts=texts, path=self.path, hit=True)

    def get_or_build(
        self,
        num_rows: int,
        embed_rows: Callable[[int, int], np.ndarray],
        texts: Sequence[str] = (),
        embed_texts: Callable[[Sequence[str]], np.ndarray] | None = None,
    ) -> TeacherTargets:
        """Load the entry, or build it: each rank embeds its own contiguous rows.

        Args:
            num_rows: dataset rows.
            embed_rows: ``(start, end) -> (end - start, K, D)`` teacher embeddings of those rows.
            texts: captions / class prompts whose teacher embeddings are cached too.
            embed_texts: ``texts -> (M, D)``; called on the main process only.
        """
        if self.complete():
            meta = json.loads((self.path / META).read_text())
            if meta.get("texts_sha") == texts_sha(texts):
                return self.load()
        self.barrier()  # every rank must agree the entry is incomplete before anyone writes
        self.path.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            (self.path / META).unlink(missing_ok=True)  # stale entry: mark incomplete before shards change
        start, end = shard_rows(num_rows, self.world, self.rank)
        _atomic_save(self.path / f"images-r{self.rank}.npy", np.asarray(embed_rows(start, end), np.float16))
        if self.rank == 0 and texts:
            if embed_texts is None:
                raise ValueError("texts given without embed_texts")
            _atomic_save(self.path / "texts.npy", np.asarray(embed_texts(texts), np.float16))
        self.barrier()
        if self.rank == 0:
            meta = {"num_rows": num_rows, "world": self.world, "num_texts": len(texts), "texts_sha": texts_sha(texts)}
            _atomic_write_text(self.path / META, json.dumps(meta))
        self.barrier()
        targets = self.load()
        targets.hit = False
        return targets
