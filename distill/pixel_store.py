"""A pre-decoded uint8 image store for small training images (``data.pixel_store``).

Decoding a JPEG per image per step is most of what a small student's training loop spends on a
CPU: the default job's ``resnet-cifar-m`` trains at about 360 images/s against 630-730 for its
raw step. A dataset whose images, at the student's input size, fit in a few GB is decoded once,
resized and cropped by the student's own transform, and kept as ``(N, 3, H, W)`` uint8; a batch
is then an index lookup, copied to the device as uint8 (a quarter of the float bytes) and
normalised there. Larger datasets stay on the decoding path (DataLoader workers).

Layout of one entry ``<root>/<key>/`` (the key hashes dataset fingerprint and transform):
    pixels.npy   uint8 (N, 3, H, W), rows that failed to decode are zeros
    valid.npy    bool (N,)
    meta.json    written last, atomically: its presence means "complete"; it records the size and
                 sha256 of both files, checked before every run uses them (a damaged store is rebuilt)
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from clipcore.augment import RowViews
from clipcore.cache import atomic_save_npy, atomic_write_text, check_digest, file_digest
from clipcore.data import DataSpecError
from clipcore.imaging import ImageDecodeError, ImageTransform, decode_image, to_rgb

log = logging.getLogger("distill.train")
META = "meta.json"
FILES = ("pixels.npy", "valid.npy")  # their sizes and sha256 are in meta.json, checked before each run uses them
FORMAT = "pixel-store-v1"


def store_key(dataset_fp: str, transform: ImageTransform, view_key: str = "") -> str:
    """``view_key``: the layout of a mixture's fixed views (:class:`clipcore.augment.RowViews`), "" for none."""
    fields = {"format": FORMAT, "data": dataset_fp, "transform": transform.to_json()}
    if view_key:  # absent otherwise: stores built before views existed keep their keys
        fields["views"] = view_key
    blob = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def store_bytes(num_rows: int, transform: ImageTransform) -> int:
    h, w = transform.output_size
    return num_rows * 3 * h * w


def to_uint8(image, transform: ImageTransform) -> np.ndarray:
    """The student's resize and crop, before rescaling and normalisation: (3, H, W) uint8."""
    image = transform.crop(transform.resize(to_rgb(image)))
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


class _Decode(Dataset):
    def __init__(self, ds, image_column: str, transform: ImageTransform, name: str, view: RowViews | None = None):
        self.ds, self.column, self.transform, self.name, self.view = ds, image_column, transform, name, view
        self.shape = (3, *transform.output_size)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int):
        try:
            image = decode_image(self.ds[int(index)][self.column], source=f"{self.name} row {index}")
            if self.view is not None:
                image = self.view(image, int(index))
            return torch.from_numpy(to_uint8(image, self.transform)), True
        except ImageDecodeError as exc:
            log.warning("%s: skipping row %d: %s", self.name, index, exc)
            return torch.zeros(self.shape, dtype=torch.uint8), False


@dataclass
class PixelStore:
    """``pixels[row]`` uint8 at the student's size; ``substitute[row]``: the row used in its place
    (itself, or the next decodable one, as :class:`distill.train_data.TrainRows` does)."""

    pixels: np.ndarray  # (N, 3, H, W) uint8, possibly memory-mapped
    substitute: torch.Tensor  # (N,) long, -1 where no decodable row follows within max_tries
    transform: ImageTransform
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.pixels)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        rows = self.substitute[index]
        if (rows < 0).any():
            bad = int(index[rows < 0][0])
            raise DataSpecError(f"{self.path}: row {bad} and the rows after it all failed to decode")  # bad data: exit 2
        return rows

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.take(self.pixels, rows.numpy(), axis=0))

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float32, bit for bit what :meth:`ImageTransform.__call__` returns."""
        t = self.transform
        mean = torch.tensor(t.mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(t.std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
        return (pixels.float() * torch.tensor(t.rescale_factor, dtype=torch.float32) - mean) / std


def substitutes(valid: np.ndarray, max_tries: int = 16) -> torch.Tensor:
    n = len(valid)
    if valid.all():
        return torch.arange(n)
    out = torch.full((n,), -1, dtype=torch.long)
    for i in range(n):
        for attempt in range(max_tries):
            if valid[(i + attempt) % n]:
                out[i] = (i + attempt) % n
                break
    return out


def build(ds, image_column: str, transform: ImageTransform, path: Path, name: str, num_workers: int = 0,
          view: RowViews | None = None) -> None:
    """Decode every row once into ``path`` (meta.json last)."""
    from tqdm.auto import tqdm

    path.mkdir(parents=True, exist_ok=True)
    (path / META).unlink(missing_ok=True)
    pixels = np.zeros((len(ds), 3, *transform.output_size), dtype=np.uint8)
    valid = np.zeros(len(ds), dtype=bool)
    loader = DataLoader(_Decode(ds, image_column, transform, name, view), batch_size=256, num_workers=num_workers)
    start = 0
    for batch, ok in tqdm(loader, desc="decoding images once (pixel store)", unit="batch", mininterval=10, leave=False):
        pixels[start:start + len(batch)] = batch.numpy()
        valid[start:start + len(batch)] = ok.numpy()
        start += len(batch)
    atomic_save_npy(path / "pixels.npy", pixels)
    atomic_save_npy(path / "valid.npy", valid)
    meta = {"format": FORMAT, "num_rows": len(ds), "failed": int((~valid).sum()), "transform": transform.to_dict(),
            "files": {name: file_digest(path / name) for name in FILES}}
    atomic_write_text(path / META, json.dumps(meta))


def damage(path: Path, num_rows: int) -> str | None:
    """Why the store at ``path`` cannot be used (None: it can): a file missing, of another size or
    sha256 than ``meta.json`` records, or of another row count. Stores written before the digests
    were recorded get the size check (from their own headers) only.

    Hashing costs about 3.5 s per GB here (CIFAR-10 at 32x32 is 154 MB: 0.5 s), once per run on
    each machine's main process, against the minutes the decoding pass that built it took.
    """
    try:
        meta = json.loads((path / META).read_text())
        if not isinstance(meta, dict) or meta.get("num_rows") != num_rows:
            return f"{META}: records {meta.get('num_rows') if isinstance(meta, dict) else meta!r} rows, expected {num_rows}"
        if "files" in meta:
            for name in FILES:
                check_digest(path / name, meta["files"].get(name) if isinstance(meta["files"], dict) else None)
        for name in FILES:
            if len(np.load(path / name, mmap_mode="r")) != num_rows:  # a truncated file fails to map
                return f"{name}: not {num_rows} rows"
    except (OSError, ValueError, EOFError) as exc:  # DamagedEntry and JSON errors are ValueErrors
        return f"{type(exc).__name__}: {exc}"
    return None


def load(path: Path, transform: ImageTransform) -> PixelStore:
    pixels = np.load(path / "pixels.npy", mmap_mode="r")
    valid = np.load(path / "valid.npy")
    return PixelStore(pixels, substitutes(valid), transform, path)


def get_or_build(ds, image_column: str, transform: ImageTransform, root: str | Path, name: str, accelerator,
                 num_workers: int = 0, view: RowViews | None = None) -> PixelStore:
    """Load the store of (``ds``, ``transform``, ``view``) or build it on each machine's main process first.

    ``view``: a mixture's fixed views, applied to each row before the transform (as the teacher saw it).
    """
    path = Path(root) / store_key(ds._fingerprint, transform, view.key if view is not None else "")
    with accelerator.local_main_process_first():  # per machine: the cache directory may be local
        if accelerator.is_local_main_process:
            why = damage(path, len(ds)) if (path / META).is_file() else "absent"
            if why != "absent" and why is not None:
                log.warning("pixel store %s: %s; rebuilding it", path, why)
            if why is not None:
                log.info("pixel store: decoding %d images once into %s", len(ds), path)
                build(ds, image_column, transform, path, name, num_workers, view)
    store = load(path, transform)
    log.info("pixel store: %d images of %s uint8 (%.0f MB) from %s", len(store), tuple(store.pixels.shape[1:]),
             store.pixels.nbytes / 2**20, path)
    return store
