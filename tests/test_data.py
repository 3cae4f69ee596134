"""clipcore.data: loading local parquet/imagefolder data, columns, decoding failures, batching."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from clipcore.data import (
    Columns,
    DatasetUnavailableError,
    DataSpec,
    DataSpecError,
    DecodeStats,
    ImageDataset,
    available_splits,
    class_names,
    collate,
    flatten_captions,
    load_hf_dataset,
    make_loader,
    resolve_columns,
)
from clipcore.imaging import ImageTransform, decode_image

from .conftest import require_shared

NAMES = ["cat", "dog", "bird"]
TEACHER = ImageTransform(size=32, crop_size=(32, 32))
STUDENT = ImageTransform(size=(16, 16), crop_size=None, mean=(0.5,) * 3, std=(0.5,) * 3, resample="bilinear")
TRANSFORMS = {"teacher": TEACHER, "student": STUDENT}


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _rgb(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _mixed_images() -> list[dict]:
    """RGB, corrupt, grayscale, RGBA, 16-bit and non-square images, as datasets Image values."""
    gray16 = np.tile(np.linspace(0, 65535, 20), (20, 1)).astype(np.uint16)
    images = [
        _encode(_rgb(24, 24, 0), "JPEG"),
        b"\xff\xd8\xff\xe0 this is not a jpeg",
        _encode(Image.new("L", (20, 20), 90), "PNG"),
        _encode(Image.new("RGBA", (20, 20), (0, 0, 0, 0)), "PNG"),
        _encode(Image.fromarray(gray16), "PNG"),
        _encode(_rgb(50, 37, 1), "JPEG"),
    ]
    return [{"bytes": b, "path": f"img{i}.png"} for i, b in enumerate(images)]


def _labelled(images: list[dict], labels: list[int]) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory) -> Path:
    """``test`` split: 6 rows incl. one corrupt image; ``train`` split: 3 rows."""
    root = tmp_path_factory.mktemp("parquet_ds")
    (root / "data").mkdir()
    _labelled(_mixed_images(), [0, 1, 2, 0, 1, 2]).to_parquet(str(root / "data" / "test-00000-of-00001.parquet"))
    train = [{"bytes": _encode(_rgb(10, 10, s), "PNG"), "path": None} for s in range(3)]
    _labelled(train, [2, 1, 0]).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    (root / "README.md").write_text("not data\n")
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagefolder")
    for cls, seeds in (("cat", (0, 1)), ("dog", (2,))):
        (root / cls).mkdir()
        for s in seeds:
            _rgb(30, 20, s).save(root / cls / f"{s}.jpg")
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    return root


@pytest.fixture(scope="module")
def caption_dirs(tmp_path_factory) -> dict[str, Path]:
    """``single``: one caption (a string) per image; ``multi``: a list per image, one empty."""
    root = tmp_path_factory.mktemp("captions")
    imgs = [{"bytes": _encode(_rgb(20, 20, s), "PNG"), "path": None} for s in range(3)]
    single = datasets.Dataset.from_dict(
        {"image": imgs, "caption": ["a red thing", "a blue thing", "a green thing"]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}),
    )
    multi = datasets.Dataset.from_dict(
        {
            "image": imgs,
            "captions": [["one", "uno"], [], ["three", "  ", "drei", "tres"]],
            "split": ["train", "val", "val"],
        },
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "captions": datasets.List(datasets.Value("string")),
                "split": datasets.Value("string"),
            }
        ),
    )
    for name, ds in (("single", single), ("multi", multi)):
        (root / name).mkdir()
        ds.to_parquet(str(root / name / "all-00000-of-00001.parquet"))
    return {"single": root / "single", "multi": root / "multi"}


def _spec(path: Path, tmp_path: Path, **kw) -> DataSpec:
    return DataSpec(path=str(path), cache_dir=str(tmp_path / "hf-cache"), **kw)


def _drain(loader) -> tuple[list[dict], DecodeStats]:
    stats, batches = DecodeStats(), []
    for batch in loader:
        stats.update(batch)
        batches.append(batch)
    return batches, stats


# ------------------------------------------------------------------ loading and columns


def test_parquet_dir_columns_and_class_names(parquet_dir, tmp_path):
    ds = load_hf_dataset(_spec(parquet_dir, tmp_path, split="test"))
    assert len(ds) == 6
    assert ds.features["image"] == datasets.Image(decode=False)  # decoding is ours
    assert ds[1]["image"]["bytes"].startswith(b"\xff\xd8")
    cols = resolve_columns(ds)
    assert cols == Columns(image="image", label="label", captions=None)
    assert class_names(ds, cols.label) == NAMES
    assert ImageDataset(ds, {"s": STUDENT}).name.endswith("[test]")  # warnings name the source
    assert available_splits(str(parquet_dir)) == ["test", "train"]
    assert len(load_hf_dataset(_spec(parquet_dir, tmp_path, split="train"))) == 3


def test_split_errors(parquet_dir, tmp_path):
    with pytest.raises(DataSpecError, match=r"no split 'validation'.*\['test', 'train'\]"):
        load_hf_dataset(_spec(parquet_dir, tmp_path, split="validation"))
    with pytest.raises(DataSpecError, match=r"has splits \['test', 'train'\]; choose one"):
        load_hf_dataset(_spec(parquet_dir, tmp_path))


def test_single_parquet_file(parquet_dir, tmp_path):
    path = parquet_dir / "data" / "train-00000-of-00001.parquet"
    assert len(load_hf_dataset(_spec(path, tmp_path, split="train"))) == 3


def test_limit_first_and_seeded_subset(parquet_dir, tmp_path):
    first = load_hf_dataset(_spec(parquet_dir, tmp_path, split="test", limit=2))
    assert [r["image"]["path"] for r in first] == ["img0.png", "img1.png"]
    subset = [_spec(parquet_dir, tmp_path, split="test", limit=3, shuffle_seed=s) for s in (7, 7, 8)]
    picks = [[r["image"]["path"] for r in load_hf_dataset(spec)] for spec in subset]
    assert picks[0] == picks[1] and len(picks[0]) == 3
    assert picks[0] == sorted(picks[0])  # subsets keep dataset order
    assert len(load_hf_dataset(_spec(parquet_dir, tmp_path, split="test", limit=100))) == 6
    with pytest.raises(DataSpecError, match="limit must be a positive"):
        DataSpec(path="x", limit=0)


def test_fingerprint_follows_content_not_path_or_mtime(parquet_dir, tmp_path):
    # Feature caches are keyed on this fingerprint: a copied or re-synced dataset must keep it,
    # changed rows must not.
    import os
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(parquet_dir, copy)
    for f in copy.rglob("*.parquet"):
        os.utime(f, (1_000_000, 1_000_000))

    def fingerprint(path: Path, cache: str, **kw) -> str:
        return load_hf_dataset(DataSpec(path=str(path), cache_dir=str(tmp_path / cache), **kw))._fingerprint

    original = fingerprint(parquet_dir, "a", split="test")
    assert fingerprint(copy, "b", split="test") == original
    assert fingerprint(copy, "b", split="train") != original
    assert fingerprint(copy, "b", split="test", limit=2) not in (original, fingerprint(copy, "b", split="test", limit=3))
    _labelled(_mixed_images(), [2, 1, 0, 2, 1, 0]).to_parquet(str(copy / "data" / "test-00000-of-00001.parquet"))
    assert fingerprint(copy, "c", split="test") != original


def test_configured_columns_and_errors(parquet_dir, tmp_path):
    ds = load_hf_dataset(_spec(parquet_dir, tmp_path, split="test", image_column="image", label_column="label"))
    missing = r"label column 'fine' does not exist; available columns: \['image', 'label'\]"
    with pytest.raises(DataSpecError, match=missing):
        resolve_columns(ds, DataSpec(path="x", label_column="fine"))
    with pytest.raises(DataSpecError, match=r"image column 'pixels' does not exist.*\['image', 'label'\]"):
        load_hf_dataset(_spec(parquet_dir, tmp_path, split="test", image_column="pixels"))
    no_image = datasets.Dataset.from_dict({"x": [1], "label": [0]})
    with pytest.raises(DataSpecError, match=r"no image column found; available columns: \['x', 'label'\]"):
        resolve_columns(no_image)
    assert resolve_columns(datasets.Dataset.from_dict({"img": ["a.png"], "label": [3]})) == Columns("img", "label")
    with pytest.raises(DataSpecError, match="not a ClassLabel.*pass the class names explicitly"):
        class_names(no_image, "label")


def test_string_labels_are_not_targets():
    ds = datasets.Dataset.from_dict({"image": ["a.png"], "label": ["cat"]})
    assert resolve_columns(ds).label is None


def test_path_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataSpecError, match="empty: no parquet files and no images found"):
        load_hf_dataset(DataSpec(path=str(empty)))
    (empty / "notes.txt").write_text("x")
    with pytest.raises(DataSpecError, match="no parquet files and no images found"):
        load_hf_dataset(DataSpec(path=str(empty)))
    with pytest.raises(DataSpecError, match="does not exist"):
        load_hf_dataset(DataSpec(path=str(tmp_path / "nope")))
    with pytest.raises(DataSpecError, match="does not exist"):
        load_hf_dataset(DataSpec(path="../no/such/dir"))


def test_single_file_errors(parquet_dir, tmp_path):
    csv = tmp_path / "rows.csv"
    csv.write_text("image,label\n")
    with pytest.raises(DataSpecError, match=r"rows.csv: a single data file must be .parquet; or pass its directory"):
        load_hf_dataset(DataSpec(path=str(csv)))
    with pytest.raises(DataSpecError, match=r"rows.csv is not a directory"):
        available_splits(str(csv))
    assert available_splits(str(parquet_dir)) == ["test", "train"]


def test_several_columns_of_one_role_must_be_chosen():
    names = datasets.ClassLabel(names=["a", "b"])
    ds = datasets.Dataset.from_dict({"image": ["a.png"], "coarse": [0], "fine": [1]},
                                    features=datasets.Features({"image": datasets.Value("string"),
                                                                "coarse": names, "fine": names}))
    with pytest.raises(DataSpecError, match=r"several label columns \['coarse', 'fine'\]; choose one with label_column="):
        resolve_columns(ds)
    assert resolve_columns(ds, DataSpec(path="x", label_column="fine")).label == "fine"
    single = ds.remove_columns("coarse")
    assert resolve_columns(single).label == "fine"  # one ClassLabel column, whatever its name


def test_hub_id_offline_says_pass_a_local_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DatasetUnavailableError, match="nobody-xyz/no-such-dataset.*pass a local directory"):
        load_hf_dataset(DataSpec(path="nobody-xyz/no-such-dataset", split="test", cache_dir=str(tmp_path)))


# ------------------------------------------------------------------ decoding and batching


def test_loader_two_transforms_and_failures(parquet_dir, tmp_path, caplog):
    dataset = ImageDataset.from_spec(_spec(parquet_dir, tmp_path, split="test"), TRANSFORMS)
    assert len(dataset) == 6
    with caplog.at_level(logging.WARNING, logger="clipcore.data"):
        batches, stats = _drain(make_loader(dataset, batch_size=4))
        dataset[1]  # a second failure of the same row does not warn again
    assert [b["num_failed"] for b in batches] == [1, 0]
    assert batches[0]["failed_index"] == [1]
    first = batches[0]
    assert first["pixel_values_teacher"].shape == (3, 3, 32, 32)
    assert first["pixel_values_student"].shape == (3, 3, 16, 16)
    assert first["pixel_values_teacher"].dtype == torch.float32
    assert first["label"].tolist() == [0, 2, 0] and first["index"].tolist() == [0, 2, 3]
    assert batches[1]["index"].tolist() == [4, 5]
    assert "valid" not in first
    assert (stats.seen, stats.failed, stats.ok, stats.failed_indices) == (6, 1, 5, [1])
    assert stats.message().startswith("skipped 1 images that failed to decode")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "row 1" in warnings[0] and "[test]" in warnings[0]

    # Each transform sees the same decoded image.
    raw = load_hf_dataset(_spec(parquet_dir, tmp_path, split="test"))[5]["image"]
    np.testing.assert_allclose(batches[1]["pixel_values_student"][1].numpy(), STUDENT(decode_image(raw)))
    np.testing.assert_allclose(batches[1]["pixel_values_teacher"][1].numpy(), TEACHER(decode_image(raw)))


def test_odd_modes_decode_to_sane_pixels(parquet_dir, tmp_path):
    dataset = ImageDataset.from_spec(_spec(parquet_dir, tmp_path, split="test"), {"s": STUDENT})
    rgba, gray16 = dataset[3]["pixel_values_s"], dataset[4]["pixel_values_s"]
    assert torch.allclose(rgba, torch.ones_like(rgba))  # transparent -> white -> (1 - 0.5) / 0.5
    row = gray16[0, 8]
    assert row[0] < -0.9 and row[-1] > 0.9  # a 16-bit gradient keeps its range


def test_invalid_sample_has_right_shapes(parquet_dir, tmp_path):
    dataset = ImageDataset.from_spec(_spec(parquet_dir, tmp_path, split="test", limit=2), TRANSFORMS)
    item = dataset[1]
    assert item["valid"] is False and item["index"] == 1 and item["label"] == 1
    assert item["pixel_values_teacher"].shape == (3, 32, 32) and item["pixel_values_student"].shape == (3, 16, 16)
    assert not item["pixel_values_teacher"].any()
    batch = collate([item, item])
    assert batch["num_failed"] == 2 and batch["failed_index"] == [1, 1]
    assert batch["pixel_values_teacher"].shape == (0, 3, 32, 32) and batch["label"].shape == (0,)


def test_loader_with_worker_process(parquet_dir, tmp_path):
    dataset = ImageDataset.from_spec(_spec(parquet_dir, tmp_path, split="test"), {"s": STUDENT})
    batches, stats = _drain(make_loader(dataset, batch_size=3, shuffle=True, num_workers=1, seed=3))
    assert stats.failed == 1 and stats.seen == 6
    assert sorted(i for b in batches for i in b["index"].tolist()) == [0, 2, 3, 4, 5]
    again, _ = _drain(make_loader(dataset, batch_size=3, shuffle=True, num_workers=0, seed=3))
    assert [b["index"].tolist() for b in again] == [b["index"].tolist() for b in batches]


def test_in_memory_dataset_with_decoding_image_feature_does_not_crash():
    ds = _labelled(_mixed_images()[:2], [0, 1])  # Image(decode=True): datasets would raise on row 1
    dataset = ImageDataset(ds, {"s": STUDENT})
    assert dataset.ds.features["image"] == datasets.Image(decode=False)
    assert [dataset[i]["valid"] for i in range(2)] == [True, False]


def test_image_paths_column(tmp_path):
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"{i}.png"))
        _rgb(12, 12, i).save(paths[-1])
    paths.append(str(tmp_path / "missing.png"))
    ds = datasets.Dataset.from_dict({"image": paths, "text": ["a", "b", "c"]})
    dataset = ImageDataset(ds, {"s": STUDENT})
    assert dataset.columns == Columns("image", None, "text")
    batch = collate([dataset[i] for i in range(3)])
    assert batch["num_failed"] == 1 and batch["captions"] == [["a"], ["b"]]


def test_transform_without_fixed_size_rejected():
    ds = _labelled(_mixed_images()[:1], [0])
    with pytest.raises(ValueError, match="transform 'bad'.*fixed size"):
        ImageDataset(ds, {"bad": ImageTransform(size=32, crop_size=None)})
    with pytest.raises(ValueError, match="at least one transform"):
        ImageDataset(ds, {})


def test_imagefolder(image_folder, tmp_path):
    spec = _spec(image_folder, tmp_path)
    ds = load_hf_dataset(spec)  # one split ("train"), taken without naming it
    assert len(ds) == 4 and class_names(ds, "label") == ["cat", "dog"]
    dataset = ImageDataset.from_spec(spec, TRANSFORMS)
    batches, stats = _drain(make_loader(dataset, batch_size=8))
    assert stats.failed == 1 and "broken.jpg" in str(ds[stats.failed_indices[0]]["image"]["path"])
    assert sorted(batches[0]["label"].tolist()) == [0, 0, 1]
    assert batches[0]["pixel_values_student"].shape == (3, 3, 16, 16)


# ------------------------------------------------------------------ captions


def test_single_caption_per_image(caption_dirs, tmp_path):
    ds = load_hf_dataset(_spec(caption_dirs["single"], tmp_path))
    cols = resolve_columns(ds)
    assert cols == Columns("image", None, "caption")
    assert flatten_captions(ds, cols.captions) == (["a red thing", "a blue thing", "a green thing"], [0, 1, 2])
    item = ImageDataset(ds, {"s": STUDENT}, cols)[1]
    assert item["captions"] == ["a blue thing"] and "label" not in item


def test_several_captions_per_image(caption_dirs, tmp_path):
    ds = load_hf_dataset(_spec(caption_dirs["multi"], tmp_path, split="train"))
    cols = resolve_columns(ds)
    assert cols.captions == "captions"
    texts, text_to_image = flatten_captions(ds, "captions")
    assert texts == ["one", "uno", "three", "drei", "tres"]  # blank skipped; row 1 has none
    assert text_to_image == [0, 0, 2, 2, 2]
    batch = collate([ImageDataset(ds, {"s": STUDENT}, cols)[i] for i in range(3)])
    assert batch["captions"] == [["one", "uno"], [], ["three", "  ", "drei", "tres"]]
    with pytest.raises(DataSpecError, match="caption column 'caption' does not exist"):
        flatten_captions(ds, "caption")


def test_where_filters_rows(caption_dirs, tmp_path):
    ds = load_hf_dataset(_spec(caption_dirs["multi"], tmp_path, where={"split": "val"}))
    assert len(ds) == 2 and flatten_captions(ds, "captions")[1] == [1, 1, 1]
    with pytest.raises(DataSpecError, match="no rows with split == 'test'"):
        load_hf_dataset(_spec(caption_dirs["multi"], tmp_path, where={"split": "test"}))
    with pytest.raises(DataSpecError, match="where= names column 'subset'"):
        load_hf_dataset(_spec(caption_dirs["multi"], tmp_path, where={"subset": "val"}))


def test_non_string_caption_rejected():
    ds = datasets.Dataset.from_dict({"image": ["a.png"], "captions": [[1, 2]]})
    with pytest.raises(DataSpecError, match="row 0: caption 1 is not a string"):
        flatten_captions(ds, "captions")


# ------------------------------------------------------------------ real data


def test_cifar10_real_rows(tmp_path):
    root = require_shared("cifar10")
    spec = DataSpec(path=str(root), split="test", limit=16, cache_dir=str(tmp_path / "hf-cache"))
    dataset = ImageDataset.from_spec(spec, {"teacher": TEACHER})
    assert dataset.columns == Columns("img", "label", None)
    names = class_names(dataset.ds, "label")
    assert len(names) == 10 and names[0] == "airplane"
    batches, stats = _drain(make_loader(dataset, batch_size=16))
    assert stats.failed == 0 and batches[0]["pixel_values_teacher"].shape == (16, 3, 32, 32)
    assert batches[0]["label"].min() >= 0 and batches[0]["label"].max() <= 9
