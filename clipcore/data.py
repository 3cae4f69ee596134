"""Datasets for evaluation and distillation: Hugging Face loading, column detection, decoding.

Images are kept undecoded in the Hugging Face dataset (``datasets.Image(decode=False)``) and
decoded here, once per item, with :func:`clipcore.imaging.decode_image`: a corrupt file then
becomes an invalid sample that :func:`collate` drops and counts, instead of an exception
inside ``datasets`` that would kill a whole evaluation.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import datasets
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from clipcore.imaging import ImageDecodeError, ImageTransform, decode_image

logger = logging.getLogger(__name__)

IMAGE_NAMES = ("image", "img", "images", "picture", "jpg", "png")
LABEL_NAMES = ("label", "labels", "fine_label", "class", "target")
CAPTION_NAMES = ("captions", "caption", "text", "texts", "sentences", "sentence")
_METADATA_NAMES = {"metadata.csv", "metadata.jsonl", "metadata.parquet"}


class DataSpecError(ValueError):
    """A dataset, split or column does not match what was asked for; the message says what exists."""


class DatasetUnavailableError(OSError):
    """A hub dataset could not be reached (offline or unknown id); pass a local directory instead."""


@dataclass
class DataSpec:
    """Where a dataset lives and which part of it to use.

    Attributes:
        path: hub id (``uoft-cs/cifar10``), a directory of parquet files (searched recursively,
            splits from file names such as ``test-00000-of-00001.parquet``), an image folder with
            class subfolders, or a single parquet file.
        split: split name; None takes the only split and fails when there are several.
        image_column, label_column, caption_column: None auto-detects (see :func:`resolve_columns`).
        limit: keep only this many rows (the first ones, or a seeded random subset).
        shuffle_seed: with ``limit``, draw a random subset with this seed (kept in dataset order).
        where: keep only rows whose columns equal these values, e.g. ``{"split": "val"}`` for
            coco-mini, which stores its split as a column; applied before ``limit``.
        name: dataset configuration name (hub datasets only).
        cache_dir: where ``datasets`` writes its Arrow cache (default: the HF cache).
    """

    path: str
    split: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    caption_column: str | None = None
    limit: int | None = None
    shuffle_seed: int | None = None
    where: Mapping[str, Any] | None = None
    name: str | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit <= 0:
            raise DataSpecError(f"limit must be a positive number of rows, got {self.limit}")

    @classmethod
    def from_config(cls, data, seed: int) -> "DataSpec":
        """The training split of a ``data`` config section (``distill.config.DataConfig``): its
        columns, and with ``train_limit`` a subset of that many rows drawn with ``seed``."""
        return cls(path=data.train, split=data.train_split, image_column=data.image_column,
                   label_column=data.label_column, caption_column=data.caption_column,
                   limit=data.train_limit, shuffle_seed=seed if data.train_limit else None)

    @property
    def label(self) -> str:
        """A short description for logs and reports: ``path[split]``."""
        return f"{self.path}[{self.split}]" if self.split else self.path


@dataclass(frozen=True)
class Columns:
    """The columns that hold images, integer labels and captions (None when absent)."""

    image: str
    label: str | None = None
    captions: str | None = None


# ---------------------------------------------------------------------------------------- loading


def _is_local(path: str) -> bool:
    # Strings that look like paths must never fall through to a hub lookup: a typo in a local
    # path would otherwise surface as a confusing "couldn't reach the Hub" error.
    return Path(path).expanduser().exists() or path.startswith((".", "/", "~")) or path.count("/") > 1


def _visible_files(directory: Path) -> list[Path]:
    return [
        p for p in directory.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    ]


def _local_format(directory: Path) -> str:
    """``parquet`` or ``imagefolder`` from the files present; error when neither fits."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    files = _visible_files(directory)
    if any(p.suffix == ".parquet" and p.name not in _METADATA_NAMES for p in files):
        return "parquet"
    image_ext = {e.lower() for e in ImageFolder.EXTENSIONS}
    if any(p.suffix.lower() in image_ext for p in files):
        return "imagefolder"
    raise DataSpecError(
        f"{directory}: no parquet files and no images found "
        f"({len(files)} other files); expected *.parquet or class subfolders with images"
    )


def _local_split_files(directory: Path, fmt: str) -> dict[str, list[str]]:
    """Split name -> files, using the same file-name conventions as ``load_dataset(data_dir=...)``."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        patterns = get_data_patterns(str(directory))
    except Exception as exc:  # EmptyDatasetError and friends
        raise DataSpecError(f"{directory}: no data files found ({exc})") from exc
    found = DataFilesDict.from_local_or_remote(patterns, base_path=str(directory))
    splits = {}
    for split, files in found.items():
        # Parquet dirs may hold notes or side files (tiny-imagenet's words.json); the
        # imagefolder builder filters by extension itself and needs its metadata files.
        keep = [
            f for f in files
            if fmt != "parquet" or (f.endswith(".parquet") and Path(f).name not in _METADATA_NAMES)
        ]
        if keep:
            splits[str(split)] = keep
    return splits


def available_splits(path: str) -> list[str]:
    """Split names of a local directory, without loading anything."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise DataSpecError(f"{path} is not a directory")
    return sorted(_local_split_files(directory, _local_format(directory)))


def _pick_split(spec: DataSpec, available: Sequence[str]) -> str:
    if spec.split is None:
        if len(available) == 1:
            return available[0]
        raise DataSpecError(f"{spec.path} has splits {sorted(available)}; choose one with split=...")
    if spec.split not in available:
        raise DataSpecError(f"{spec.path} has no split {spec.split!r}; available splits: {sorted(available)}")
    return spec.split


def _load_local(spec: DataSpec) -> datasets.Dataset:
    path = Path(spec.path).expanduser()
    if not path.exists():
        raise DataSpecError(f"dataset path {spec.path} does not exist")
    if path.is_file():
        if path.suffix != ".parquet":
            raise DataSpecError(f"{spec.path}: a single data file must be .parquet; or pass its directory")
        fmt, splits = "parquet", {spec.split or "train": [str(path)]}
    else:
        fmt = _local_format(path)
        splits = _local_split_files(path, fmt)
        if not splits:
            raise DataSpecError(f"{spec.path}: no {fmt} files match a split name")
    split = _pick_split(spec, list(splits))
    # Only the requested split's files: preparing every split (50k CIFAR train images for a
    # test-set evaluation) would cost time and cache space for nothing.
    ds = datasets.load_dataset(fmt, data_files={split: splits[split]}, split=split, cache_dir=spec.cache_dir)
    # ``datasets`` fingerprints local files by path and modification time, so a copied or
    # re-synced dataset looked new and every teacher-feature cache keyed on it went cold (a
    # 20-minute tower pass for CIFAR-10 on a CPU). Key on what the files hold instead.
    fingerprint = content_fingerprint(splits[split], f"{fmt}/{split}")
    return datasets.Dataset(ds.data, info=ds.info, split=ds.split, fingerprint=fingerprint)


def content_fingerprint(files: Sequence[str], salt: str = "") -> str:
    """Hash of files by name (relative to their common folder), size and bytes; not by path or mtime.

    It reads every byte on every load: about 1 s per GB here (60 ms for CIFAR-10's 56 MB; see
    docs/benchmarks.md), noticeable only for local datasets of tens of GB.
    """
    paths = sorted(Path(f) for f in files)
    root = Path(os.path.commonpath(paths)) if len(paths) > 1 else paths[0].parent
    digest = hashlib.sha256(salt.encode())
    for path in paths:
        with path.open("rb") as fh:
            file_hash = hashlib.file_digest(fh, "sha256").hexdigest()
        digest.update(f"{path.relative_to(root).as_posix()}:{path.stat().st_size}:{file_hash};".encode())
    return digest.hexdigest()[:32]


def _load_hub(spec: DataSpec) -> datasets.Dataset:
    try:
        loaded = datasets.load_dataset(spec.path, spec.name, split=spec.split, cache_dir=spec.cache_dir)
    except ValueError as exc:
        if "Unknown split" in str(exc):
            raise DataSpecError(f"{spec.path}: no split {spec.split!r} ({exc})") from exc
        raise
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as exc:
        raise DatasetUnavailableError(
            f"cannot load dataset {spec.path!r} from the Hugging Face hub ({type(exc).__name__}: {exc}); "
            "this machine may be offline: pass a local directory of parquet files or images instead, "
            "e.g. ../shared/data/cifar10"
        ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded[_pick_split(spec, list(loaded))]
    return loaded


def _filter_rows(ds: datasets.Dataset, where: Mapping[str, Any], source: str) -> datasets.Dataset:
    for column, value in where.items():
        if column not in ds.column_names:
            raise DataSpecError(f"{source}: where= names column {column!r}; available columns: {ds.column_names}")
        keep = [i for i, v in enumerate(ds[column]) if v == value]
        if not keep:
            raise DataSpecError(f"{source}: no rows with {column} == {value!r}")
        ds = ds.select(keep)
    return ds


def _limit_rows(ds: datasets.Dataset, limit: int | None, seed: int | None) -> datasets.Dataset:
    if limit is None or limit >= len(ds):
        return ds
    if seed is None:
        return ds.select(range(limit))
    # Sorted, so that the subset reads in dataset order (faster, and stable reports).
    rows = np.sort(np.random.default_rng(seed).choice(len(ds), size=limit, replace=False))
    return ds.select(rows.tolist())


def undecoded(ds: datasets.Dataset, image_column: str) -> datasets.Dataset:
    """Cast ``image_column`` to ``Image(decode=False)`` so that decoding happens in our code."""
    feature = ds.features[image_column]
    if isinstance(feature, datasets.Image) and not feature.decode:
        return ds
    try:
        return ds.cast_column(image_column, datasets.Image(decode=False))
    except Exception as exc:
        raise DataSpecError(
            f"column {image_column!r} ({feature}) cannot hold images: it must contain image bytes or paths"
        ) from exc


def load_hf_dataset(spec: DataSpec) -> datasets.Dataset:
    """Load ``spec`` as a ``datasets.Dataset`` with an undecoded image column.

    Raises:
        DataSpecError: unknown path, split or column, or a directory without data.
        DatasetUnavailableError: a hub id that cannot be reached.
    """
    ds = _load_local(spec) if _is_local(spec.path) else _load_hub(spec)
    if spec.where:
        ds = _filter_rows(ds, spec.where, spec.label)
    ds = _limit_rows(ds, spec.limit, spec.shuffle_seed)
    ds = undecoded(ds, resolve_columns(ds, spec).image)
    ds.info.dataset_name = spec.label  # so that ImageDataset warnings name the source, not "parquet"
    return ds


# ---------------------------------------------------------------------------------------- columns


def _is_text(feature: Any) -> bool:
    if isinstance(feature, datasets.Value):
        return feature.dtype in ("string", "large_string")
    if isinstance(feature, (datasets.List, datasets.Sequence, datasets.LargeList)):
        return isinstance(feature.feature, datasets.Value) and feature.feature.dtype in ("string", "large_string")
    return False


def _check_configured(ds: datasets.Dataset, column: str | None, role: str) -> str | None:
    if column is not None and column not in ds.column_names:
        raise DataSpecError(f"{role} column {column!r} does not exist; available columns: {ds.column_names}")
    return column


def _detect(typed: list[str], names: Sequence[str], role: str, fallback: Sequence[str]) -> str | None:
    """A column of the right feature type (preferring the usual names), else a ``fallback``
    column with a usual name."""
    for name in names:
        if name in typed:
            return name
    if len(typed) == 1:
        return typed[0]
    if len(typed) > 1:
        raise DataSpecError(f"several {role} columns {typed}; choose one with {role}_column=...")
    return next((n for n in names if n in fallback), None)


def resolve_columns(ds: datasets.Dataset, spec: DataSpec | None = None) -> Columns:
    """Image, label and caption columns: the configured ones, or detected.

    Detection: the image column has the ``datasets.Image`` feature (else is named image/img);
    the label column is a ``ClassLabel`` (else named label/labels); captions are a string or
    list-of-strings column named caption(s)/text/sentences.
    """
    spec = spec or DataSpec(path="<dataset>")
    feats = ds.features
    image = _check_configured(ds, spec.image_column, "image") or _detect(
        [c for c, f in feats.items() if isinstance(f, datasets.Image)], IMAGE_NAMES, "image", ds.column_names
    )
    if image is None:
        raise DataSpecError(f"no image column found; available columns: {ds.column_names}; set image_column=...")
    # A plain integer column named like a label also counts; a string one cannot become a target.
    int_columns = [c for c, f in feats.items() if isinstance(f, datasets.Value) and "int" in f.dtype]
    label = _check_configured(ds, spec.label_column, "label") or _detect(
        [c for c, f in feats.items() if isinstance(f, datasets.ClassLabel)], LABEL_NAMES, "label", int_columns
    )
    captions = _check_configured(ds, spec.caption_column, "caption")
    if captions is None:
        captions = next((n for n in CAPTION_NAMES if n in feats and _is_text(feats[n])), None)
    return Columns(image=image, label=label, captions=captions)


def class_names(ds: datasets.Dataset, label_column: str) -> list[str]:
    """Class names, in label order, from a ``ClassLabel`` column."""
    _check_configured(ds, label_column, "label")
    feature = ds.features[label_column]
    if not isinstance(feature, datasets.ClassLabel):
        raise DataSpecError(
            f"label column {label_column!r} is {feature}, not a ClassLabel, so it carries no class names; "
            "pass the class names explicitly"
        )
    return list(feature.names)


def flatten_captions(ds: datasets.Dataset, caption_column: str) -> tuple[list[str], list[int]]:
    """All captions as one list, and for each caption the row of its image.

    A row may hold one caption (a string), several (a list) or none (None or an empty list);
    blank captions are skipped because they would all embed to the same meaningless text.
    """
    _check_configured(ds, caption_column, "caption")
    texts: list[str] = []
    text_to_image: list[int] = []
    for row, value in enumerate(ds[caption_column]):
        items = [] if value is None else [value] if isinstance(value, str) else value
        for text in items:
            if not isinstance(text, str):
                raise DataSpecError(f"column {caption_column!r} row {row}: caption {text!r} is not a string")
            if text.strip():
                texts.append(text)
                text_to_image.append(row)
    return texts, text_to_image


# ---------------------------------------------------------------------------------------- torch


class ImageDataset(torch.utils.data.Dataset):
    """Items ``{"pixel_values_<key>": (3,H,W) float32, "label", "captions", "index", "valid"}``.

    Each item is decoded once and preprocessed by every transform (e.g. ``{"teacher": ...,
    "student": ...}`` at different sizes). A decode failure yields zeros and ``valid=False``;
    :func:`collate` drops such items and counts them in ``batch["num_failed"]``.
    """

    def __init__(
        self,
        ds: datasets.Dataset,
        transforms: Mapping[str, ImageTransform],
        columns: Columns | None = None,
        name: str | None = None,
        view: Callable[[Image.Image, int], Image.Image] | None = None,
    ):
        if not transforms:
            raise ValueError("ImageDataset needs at least one transform, e.g. {'teacher': transform}")
        self.columns = columns or resolve_columns(ds)
        self.shapes = {key: (3, *_output_size(key, t)) for key, t in transforms.items()}
        keep = [c for c in (self.columns.image, self.columns.label, self.columns.captions) if c]
        self.ds = undecoded(ds.select_columns(keep), self.columns.image)
        self.transforms = dict(transforms)
        self.name = name or ds.info.dataset_name or "dataset"
        self._warned: set[int] = set()  # per process: each DataLoader worker warns on its own
        # optional (image, row) -> image step between decoding and the transforms, so every
        # transform (teacher and student) sees the same augmented view
        self.view = view

    @classmethod
    def from_spec(cls, spec: DataSpec, transforms: Mapping[str, ImageTransform]) -> "ImageDataset":
        """Load ``spec`` and wrap it."""
        ds = load_hf_dataset(spec)
        return cls(ds, transforms, resolve_columns(ds, spec), name=spec.label)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.ds[int(index)]
        item: dict[str, Any] = {"index": int(index), "valid": True}
        try:
            image = decode_image(row[self.columns.image], source=f"{self.name} row {index}")
            if self.view is not None:
                image = self.view(image, int(index))
            for key, transform in self.transforms.items():
                item[f"pixel_values_{key}"] = torch.from_numpy(transform(image))
        except ImageDecodeError as exc:
            self._warn(int(index), exc)
            item["valid"] = False
            for key, shape in self.shapes.items():
                item[f"pixel_values_{key}"] = torch.zeros(shape, dtype=torch.float32)
        if self.columns.label:
            label = row[self.columns.label]
            item["label"] = -1 if label is None else int(label)
        if self.columns.captions:
            value = row[self.columns.captions]
            item["captions"] = [] if value is None else [value] if isinstance(value, str) else list(value)
        return item

    def _warn(self, index: int, exc: Exception) -> None:
        if index not in self._warned:
            self._warned.add(index)
            logger.warning("%s: skipping row %d: %s", self.name, index, exc)


def _output_size(key: str, transform: ImageTransform) -> tuple[int, int]:
    try:
        return transform.output_size
    except ValueError as exc:
        raise ValueError(f"transform {key!r}: {exc}; batching needs a fixed size (set crop_size)") from exc


def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack valid samples; drop invalid ones, counting them in ``num_failed``.

    Tensors are stacked, ints become a long tensor, lists stay lists of per-sample values.
    ``failed_index`` lists the dropped rows. A batch may be empty when every sample failed.
    """
    if not samples:
        raise ValueError("collate got no samples")
    valid = [s for s in samples if s.get("valid", True)]
    batch: dict[str, Any] = {}
    for key, first in samples[0].items():
        if key == "valid":
            continue
        values = [s[key] for s in valid]
        if isinstance(first, torch.Tensor):
            batch[key] = torch.stack(values) if values else first.new_empty((0, *first.shape))
        elif isinstance(first, (int, np.integer)) and not isinstance(first, bool):
            batch[key] = torch.tensor(values, dtype=torch.long)
        else:
            batch[key] = values
    batch["num_failed"] = len(samples) - len(valid)
    batch["failed_index"] = [int(s["index"]) for s in samples if not s.get("valid", True)]
    return batch


def make_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    shuffle: bool = False,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A ``DataLoader`` with :func:`collate` and a seeded shuffle order."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate,
        generator=generator,
        drop_last=drop_last,
        persistent_workers=False,
    )


@dataclass
class DecodeStats:
    """Counts images seen and skipped over the batches of a run; feed it every batch."""

    seen: int = 0
    failed: int = 0
    failed_indices: list[int] = field(default_factory=list)

    def update(self, batch: Mapping[str, Any]) -> None:
        failed = int(batch.get("num_failed", 0))
        self.failed += failed
        self.seen += len(batch["index"]) + failed
        self.failed_indices.extend(batch.get("failed_index", []))

    @property
    def ok(self) -> int:
        return self.seen - self.failed

    def message(self) -> str:
        """``skipped N images that failed to decode`` (with the first rows), or an empty string."""
        if not self.failed:
            return ""
        rows = ", ".join(map(str, self.failed_indices[:10])) + (", ..." if len(self.failed_indices) > 10 else "")
        return f"skipped {self.failed} images that failed to decode (rows {rows})"
