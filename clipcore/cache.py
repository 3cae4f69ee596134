"""On-disk cache of teacher targets: image embeddings (K views per image) and text embeddings.

Layout of one cache entry ``<root>/<key>/``:
    meta.json                      image targets complete (written last, atomically)
    images-r{rank}.npy             float16 (rows, K, D) for the rows ``shard_rows`` assigns to rank
    texts-{sha}.json               text targets for one list of texts complete (written last)
    texts-{sha}.npy                float16 (M, D) for the texts whose hash is ``sha``

The entry key hashes (teacher fingerprint, dataset fingerprint, teacher preprocessing, views,
seed); text targets live beside the image targets under their own key, the hash of the texts, so
switching prompt templates back and forth embeds each text list once and never redoes the image
pass. Every process writes only its own shard file, through a temporary name and ``os.replace``;
the main process writes the completion markers only after a barrier, so a half-written entry is
never read. Every load is verified: each shard's size and sha256 (recorded in ``meta.json`` when it
was built), shape and dtype, and that every target is finite; each text file's texts hash, shape and
content hash. A damaged part is rebuilt, with a warning, instead of crashing the run or handing it
wrong targets.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)
META = "meta.json"
LEGACY_TEXTS = "texts.npy"  # the layout before texts had their own key: one file, its hash in meta.json


class DamagedEntry(ValueError):
    """A cache file is missing, truncated or does not hold what its marker says."""


class NonFiniteTargets(ValueError):
    """The model that builds the targets (the teacher) gives NaN/inf: bad input, not a failed run."""


def cache_key(teacher_fp: str, dataset_fp: str, preprocess: str, views: int, seed: int) -> str:
    blob = json.dumps(
        {"teacher": teacher_fp, "data": dataset_fp, "pre": preprocess, "views": views, "seed": seed}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def texts_sha(texts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode()).hexdigest()[:20]


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` through a temporary name, synced, then renamed: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    """``path.write_text`` through a temporary name and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def shard_rows(num_rows: int, world: int, rank: int) -> tuple[int, int]:
    """Contiguous [start, end) rows of ``rank``; shards differ in size by at most one row."""
    base, extra = divmod(num_rows, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _sha256_bytes(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_digest(path: Path) -> dict:
    """``{"bytes", "sha256"}`` of ``path``, read in 16 MB chunks.

    The cost: sha256 runs at about 3.5 s per GB on this shared 2-core machine, once when a shard is
    written and once per load (a CIFAR-10 entry, 50,000 x 1 view x 512 float16, is 51 MB: 0.2 s),
    small next to the teacher pass that built it.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def check_digest(path: Path, want: object, marker: str = META) -> None:
    """``path`` has the size and sha256 that ``marker`` recorded for it.

    Raises:
        DamagedEntry: missing, another size (truncated?), or other bytes (a corrupted or rewritten file).
    """
    if not isinstance(want, dict) or not isinstance(want.get("bytes"), int) or not isinstance(want.get("sha256"), str):
        raise DamagedEntry(f"{marker}: no size and sha256 recorded for {path.name}")
    if not path.is_file():
        raise DamagedEntry(f"{path.name}: missing")
    size = path.stat().st_size
    if size != want["bytes"]:
        raise DamagedEntry(f"{path.name}: {size} bytes, {marker} records {want['bytes']} (truncated?)")
    if file_digest(path)["sha256"] != want["sha256"]:
        raise DamagedEntry(f"{path.name}: its sha256 is not the one {marker} records (changed after it was written)")


def _full_texts_sha(texts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode()).hexdigest()


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedEntry(f"{path.name}: unreadable ({type(exc).__name__})") from exc
    if not isinstance(meta, dict):
        raise DamagedEntry(f"{path.name}: not a JSON object")
    return meta


def _load_array(path: Path, shape: tuple[int | None, ...], mmap: bool = False) -> np.ndarray:
    """``path`` as float16 of ``shape`` (None: any size); a truncated file fails to load or map."""
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DamagedEntry(f"{path.name}: unreadable ({type(exc).__name__}: {exc})") from exc
    if arr.dtype != np.float16 or arr.ndim != len(shape) or any(
            want is not None and got != want for got, want in zip(arr.shape, shape)):
        raise DamagedEntry(f"{path.name}: holds {arr.dtype} {tuple(arr.shape)}, expected float16 {shape}")
    return arr


@dataclass
class TeacherTargets:
    """Loaded cache entry: ``images[row, view]`` and ``texts[j]`` (float32 copies of the float16 files).

    ``hit`` is True when nothing had to be computed; ``images_hit`` / ``texts_hit`` say which part was.
    """

    images: np.ndarray  # (N, K, D)
    texts: np.ndarray | None  # (M, D)
    path: Path
    hit: bool
    images_hit: bool = True
    texts_hit: bool = True


class TeacherTargetCache:
    """Build-or-load one cache entry. ``barrier`` synchronises processes (``accelerator.wait_for_everyone``)."""

    def __init__(self, root: str | Path, key: str, rank: int = 0, world: int = 1,
                 barrier: Callable[[], None] = lambda: None):
        self.path = Path(root) / key
        self.rank, self.world, self.barrier = rank, world, barrier

    def load_images(self, num_rows: int) -> np.ndarray:
        """The verified image targets (N, K, D).

        Raises:
            FileNotFoundError: no complete entry.
            DamagedEntry: a shard is missing, truncated, of another shape or dtype.
        """
        if not (self.path / META).is_file():
            raise FileNotFoundError(self.path / META)
        meta = _read_meta(self.path / META)
        world = meta.get("world")
        if meta.get("num_rows") != num_rows or not isinstance(world, int) or world < 1:
            raise DamagedEntry(f"{META}: records {meta.get('num_rows')} rows over {world} shards; expected {num_rows} rows")
        # entries written before views/dim were recorded: the first shard's own (K, D) binds the others
        view_dim = (meta["views"], meta["dim"]) if "views" in meta and "dim" in meta else None
        # entries written before shard digests were recorded are checked for shape and finiteness only
        digests = meta.get("shards")
        if digests is not None and (not isinstance(digests, list) or len(digests) != world):
            raise DamagedEntry(f"{META}: 'shards' records {digests!r}; expected a size and sha256 per shard ({world})")
        parts = []
        for r in range(world):
            start, end = shard_rows(num_rows, world, r)
            if digests is not None:
                check_digest(self.path / f"images-r{r}.npy", digests[r])
            part = _load_array(self.path / f"images-r{r}.npy", (end - start, *(view_dim or (None, None))), mmap=True)
            view_dim = view_dim or part.shape[1:]
            parts.append(part)
        images = np.concatenate(parts).astype(np.float32)
        bad = ~np.isfinite(images).all(axis=tuple(range(1, images.ndim)))  # (0, 1, 0) for a texts-only entry
        if bad.any():
            raise DamagedEntry(f"image targets of {int(bad.sum())} rows hold NaN/inf (first: row {int(bad.argmax())})")
        return images

    def load_texts(self, texts: Sequence[str]) -> np.ndarray:
        """The verified text targets (M, D) of exactly ``texts``.

        Raises:
            FileNotFoundError: none cached for these texts.
            DamagedEntry: the file holds other texts, another shape, or bytes other than those written.
        """
        key = texts_sha(texts)
        marker, array = self.path / f"texts-{key}.json", self.path / f"texts-{key}.npy"
        if not marker.is_file():
            return self._load_legacy_texts(texts)
        meta = _read_meta(marker)
        if meta.get("texts_sha256") != _full_texts_sha(texts):
            raise DamagedEntry(f"{marker.name}: cached for other texts")
        if not array.is_file() or meta.get("sha256") != _sha256_bytes(array):
            raise DamagedEntry(f"{array.name}: missing, or not the bytes written with {marker.name}")
        return _load_array(array, (len(texts), None)).astype(np.float32)

    def _load_legacy_texts(self, texts: Sequence[str]) -> np.ndarray:
        meta = _read_meta(self.path / META) if (self.path / META).is_file() else {}
        if meta.get("texts_sha") != texts_sha(texts) or not (self.path / LEGACY_TEXTS).is_file():
            raise FileNotFoundError(self.path / f"texts-{texts_sha(texts)}.json")
        return _load_array(self.path / LEGACY_TEXTS, (len(texts), None)).astype(np.float32)

    def _try(self, load: Callable[[], np.ndarray]) -> np.ndarray | None:
        """``load()``, or None when it must be (re)built: absent, or damaged (then warned about)."""
        try:
            return load()
        except FileNotFoundError:
            return None
        except DamagedEntry as exc:
            if self.rank == 0:
                log.warning("teacher-target cache %s: %s; rebuilding it", self.path, exc)
            return None

    def get_or_build(
        self,
        num_rows: int,
        embed_rows: Callable[[int, int], np.ndarray],
        texts: Sequence[str] = (),
        embed_texts: Callable[[Sequence[str]], np.ndarray] | None = None,
    ) -> TeacherTargets:
        """Load the entry, or build what is missing or damaged: each rank embeds its own rows.

        Every rank reads the same files before any rank writes, so they agree on what to build.

        Args:
            num_rows: dataset rows.
            embed_rows: ``(start, end) -> (end - start, K, D)`` teacher embeddings of those rows.
            texts: captions / class prompts whose teacher embeddings are cached too.
            embed_texts: ``texts -> (M, D)``; called on the main process only.
        """
        if texts and embed_texts is None:
            raise ValueError("texts given without embed_texts")
        images = self._try(lambda: self.load_images(num_rows))
        images_hit = images is not None
        if images is None:
            images = self._build_images(num_rows, embed_rows)
        text_arr, texts_hit = None, True
        if texts:
            text_arr = self._try(lambda: self.load_texts(texts))
            texts_hit = text_arr is not None
            if text_arr is None:
                text_arr = self._build_texts(texts, embed_texts)
        return TeacherTargets(images, text_arr, self.path, images_hit and texts_hit, images_hit, texts_hit)

    def _build_images(self, num_rows: int, embed_rows: Callable[[int, int], np.ndarray]) -> np.ndarray:
        self.barrier()  # every rank must agree the images are missing before anyone writes
        self.path.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            (self.path / META).unlink(missing_ok=True)  # mark incomplete before shards change
        start, end = shard_rows(num_rows, self.world, self.rank)
        shard = np.asarray(embed_rows(start, end), np.float16)
        atomic_save_npy(self.path / f"images-r{self.rank}.npy", shard)
        self.barrier()
        # every rank reads every shard (as load_images will), so all raise together and none waits at a barrier;
        # without meta.json the shards are an unfinished entry, never read
        bad = 0
        for r in range(self.world):
            part = np.load(self.path / f"images-r{r}.npy", mmap_mode="r")
            # (an explicit row width: a texts-only entry has 0 rows, and numpy cannot infer -1 from 0 elements)
            bad += int((~np.isfinite(part.reshape(len(part), int(np.prod(part.shape[1:]))))).any(axis=1).sum())
        if bad:
            raise NonFiniteTargets(f"teacher-target cache {self.path}: the teacher gives NaN/inf image embeddings for "
                                   f"{bad} of {num_rows} rows; nothing was cached (check the teacher's weights and "
                                   "preprocessing)")
        if self.rank == 0:  # rank 0's (K, D) stands for every shard: load_images checks each against it
            meta = {"num_rows": num_rows, "world": self.world, "views": shard.shape[1], "dim": shard.shape[2],
                    "shards": [file_digest(self.path / f"images-r{r}.npy") for r in range(self.world)]}
            atomic_write_text(self.path / META, json.dumps(meta))
        self.barrier()
        return self.load_images(num_rows)

    def _build_texts(self, texts: Sequence[str], embed_texts: Callable[[Sequence[str]], np.ndarray]) -> np.ndarray:
        self.barrier()
        key = texts_sha(texts)
        if self.rank == 0:
            self.path.mkdir(parents=True, exist_ok=True)
            marker, array = self.path / f"texts-{key}.json", self.path / f"texts-{key}.npy"
            marker.unlink(missing_ok=True)
            embedded = np.asarray(embed_texts(texts), np.float16)
            bad = ~np.isfinite(embedded).all(axis=tuple(range(1, embedded.ndim)))  # no reshape: 0 rows must work too
            if bad.any():  # (one process embeds the texts: with several, the others then wait for it)
                raise NonFiniteTargets(f"teacher-target cache {self.path}: the teacher gives NaN/inf text embeddings "
                                       f"for {int(bad.sum())} of {len(texts)} texts (first: {texts[int(bad.argmax())]!r}); "
                                       "nothing was cached (check the teacher's weights)")
            atomic_save_npy(array, embedded)
            meta = {"texts_sha256": _full_texts_sha(texts), "num_texts": len(texts), "sha256": _sha256_bytes(array)}
            atomic_write_text(marker, json.dumps(meta))
        self.barrier()
        return self.load_texts(texts)
