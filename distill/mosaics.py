"""Scene-like training images for general students: seeded mosaics of a mixture's own images.

A student distilled on object-centred crops (Tiny-ImageNet) keeps most of the teacher's embedding
for one object in a frame but much less for several: on Tiny-ImageNet validation the student-teacher
cosine is 0.69 for single images and 0.51 for 2x2 mosaics of them (``benchmarks/embedding_gap.py``).
``data.mosaics`` adds ``count`` images, each a ``grid`` x ``grid`` frame of training images drawn at
random (seeded) from the mixture's sources. They are written once as a parquet dataset and then are
one more source of the mixture: the teacher embeds them once, into the same per-source target
cache, and the student trains on them like any image. (On the general recipe 20,000 of them raised
the mosaic cosine to 0.53 but not the cosine on COCO photos: docs/benchmarks.md.)

Layout of one entry ``<mosaics.dir>/<key>/`` (the key hashes the sources' fingerprints, the
settings and the seed, so the same recipe finds the same mosaics and their cached targets):
    train-0000i-of-0000n.parquet   an ``image`` column of JPEG bytes (quality 95), CHUNK frames a file
    meta.json                      written last; its presence means "complete"
It is composed by each machine's main process in a directory of its own (``<key>.tmp-<pid>``) and
renamed into place, so two runs (or machines sharing the directory) that build the same entry at
once never write into each other's files.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from clipcore.data import DataSpec, load_hf_dataset
from clipcore.imaging import ImageDecodeError, decode_image, to_rgb
from distill.config import MosaicConfig

log = logging.getLogger("distill.train")
FORMAT = "mosaics-v1"
META = "meta.json"
CHUNK = 5000  # frames per parquet file: the encoded frames of one file are held in memory at a time


def mosaic_key(fingerprints: list[str], cfg: MosaicConfig, seed: int) -> str:
    blob = json.dumps({"format": FORMAT, "sources": fingerprints, "count": cfg.count, "grid": cfg.grid,
                       "tile": cfg.tile, "seed": seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def draw_tiles(sizes: list[int], count: int, grid: int, seed: int) -> np.ndarray:
    """(count, grid*grid, 2) (source, row) pairs, uniform over all rows of all sources."""
    offsets = np.cumsum([0, *sizes])
    flat = np.random.default_rng(seed).integers(0, offsets[-1], size=(count, grid * grid))
    source = np.searchsorted(offsets, flat, side="right") - 1
    return np.stack([source, flat - offsets[source]], axis=-1)


def compose(tiles: list[Image.Image], grid: int, tile: int) -> Image.Image:
    """The tiles, each resized (bicubic) to ``tile`` x ``tile``, row by row in one frame."""
    frame = Image.new("RGB", (grid * tile, grid * tile))
    for k, image in enumerate(tiles):
        frame.paste(to_rgb(image).resize((tile, tile), Image.BICUBIC), ((k % grid) * tile, (k // grid) * tile))
    return frame


def _tile(parts: list[tuple[datasets.Dataset, str]], source: int, row: int, max_tries: int = 16) -> Image.Image:
    """The tile at (source, row), or the next decodable row of that source (as TrainRows does)."""
    ds, column = parts[source]
    tries = min(max_tries, len(ds))
    for r in (int(row + k) % len(ds) for k in range(tries)):
        try:
            return decode_image(ds[r][column])
        except ImageDecodeError as exc:
            log.warning("mosaics: data.train[%d] row %d does not decode, the next row is the tile: %s", source, r, exc)
    raise ImageDecodeError(f"mosaics: data.train[{source}] rows {row}.. ({tries} tried) do not decode")


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_mosaics(parts: list[tuple[datasets.Dataset, str]], cfg: MosaicConfig, seed: int, out: Path) -> None:
    """Compose ``cfg.count`` mosaics into ``out`` (a fresh directory), meta.json last."""
    draws = draw_tiles([len(ds) for ds, _ in parts], cfg.count, cfg.grid, seed)
    out.mkdir(parents=True)
    features = datasets.Features({"image": datasets.Image()})
    files = -(-len(draws) // CHUNK)
    for i in range(files):
        encoded = [{"bytes": _jpeg(compose([_tile(parts, s, r) for s, r in frame], cfg.grid, cfg.tile)), "path": None}
                   for frame in draws[i * CHUNK:(i + 1) * CHUNK]]
        rows = datasets.Dataset.from_dict({"image": encoded}, features=features)
        rows.to_parquet(str(out / f"train-{i:05d}-of-{files:05d}.parquet"))
    (out / META).write_text(json.dumps({"format": FORMAT, "count": cfg.count, "grid": cfg.grid, "tile": cfg.tile,
                                        "seed": seed}))


def _build_into_place(parts: list[tuple[datasets.Dataset, str]], cfg: MosaicConfig, seed: int, path: Path) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        write_mosaics(parts, cfg, seed, tmp)
        tmp.rename(path)
    except OSError:
        if not (path / META).exists():  # not "another run finished the same entry first"
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def get_or_build(parts: list[tuple[datasets.Dataset, str]], cfg: MosaicConfig, seed: int,
                 accelerator) -> tuple[datasets.Dataset, str]:
    """The mosaics of ``parts`` as one more source ``(dataset, image column)``; built by each
    machine's main process on a miss (the others wait), then loaded by every process from disk."""
    key = mosaic_key([ds._fingerprint for ds, _ in parts], cfg, seed)
    path = Path(cfg.dir) / key
    with accelerator.local_main_process_first():  # per machine, as the pixel store: the directory may be local
        if accelerator.is_local_main_process and not (path / META).exists():
            log.info("mosaics: composing %d %dx%d frames of %d px tiles into %s", cfg.count, cfg.grid, cfg.grid,
                     cfg.tile, path)
            _build_into_place(parts, cfg, seed, path)
    ds = load_hf_dataset(DataSpec(path=str(path), split="train", image_column="image"))
    log.info("training source %d: %d mosaics (%s)", len(parts), len(ds), path)
    return ds, "image"
