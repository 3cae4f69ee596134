"""Mosaic training images (distill/mosaics.py): the draw, the frames, the cache entry, a training run."""

import contextlib
import io
import json
import logging
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from clipcore.imaging import ImageDecodeError, decode_image
from distill import mosaics
from distill.config import MosaicConfig
from distill.train import main
from tests.test_general import _general_args, mixture  # noqa: F401  (the module-scoped fixture)


class _OneProcess:
    is_local_main_process = True

    @staticmethod
    def local_main_process_first():
        return contextlib.nullcontext()


def _solid(colour) -> dict:
    buf = io.BytesIO()
    Image.new("RGB", (20, 12), colour).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _images(values: list[dict]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"img": values}, features=datasets.Features({"img": datasets.Image(decode=False)}))


def test_draw_is_seeded_and_covers_every_source():
    draws = mosaics.draw_tiles([3, 5], count=400, grid=2, seed=7)
    assert draws.shape == (400, 4, 2)
    np.testing.assert_array_equal(draws, mosaics.draw_tiles([3, 5], count=400, grid=2, seed=7))
    assert not np.array_equal(draws, mosaics.draw_tiles([3, 5], count=400, grid=2, seed=8))
    pairs = {tuple(p) for p in draws.reshape(-1, 2).tolist()}
    assert pairs == {(0, r) for r in range(3)} | {(1, r) for r in range(5)}  # every row of both, none beyond


def test_compose_places_tiles_row_by_row():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    frame = np.asarray(mosaics.compose([Image.new("RGB", (30, 50), c) for c in colours], grid=2, tile=16))
    assert frame.shape == (32, 32, 3)
    for k, colour in enumerate(colours):
        y, x = (k // 2) * 16 + 8, (k % 2) * 16 + 8
        assert tuple(frame[y, x]) == colour


def test_mosaics_are_built_once_and_reused(tmp_path, caplog):
    red, blue = _images([_solid((255, 0, 0))] * 3), _images([_solid((0, 0, 255))] * 2)
    cfg = MosaicConfig(count=5, grid=2, tile=8, dir=str(tmp_path / "m"))
    with caplog.at_level(logging.INFO, logger="distill.train"):
        ds, column = mosaics.get_or_build([(red, "img"), (blue, "img")], cfg, seed=0, accelerator=_OneProcess())
        again, _ = mosaics.get_or_build([(red, "img"), (blue, "img")], cfg, seed=0, accelerator=_OneProcess())
    assert sum(r.message.startswith("mosaics: composing") for r in caplog.records) == 1
    assert len(ds) == 5 and column == "image" and ds._fingerprint == again._fingerprint
    frame = decode_image(ds[0]["image"])
    assert frame.size == (16, 16) and frame.mode == "RGB"
    entries = list((tmp_path / "m").iterdir())
    assert len(entries) == 1 and json.loads((entries[0] / "meta.json").read_text())["count"] == 5
    other, _ = mosaics.get_or_build([(red, "img"), (blue, "img")], cfg, seed=1, accelerator=_OneProcess())
    assert len(list((tmp_path / "m").iterdir())) == 2 and other._fingerprint != ds._fingerprint


def test_an_undecodable_tile_is_the_next_row_and_none_decodable_names_the_rows(tmp_path, caplog):
    mixed = _images([_solid((0, 255, 0)), {"bytes": b"not an image", "path": "broken.png"}])
    cfg = MosaicConfig(count=6, grid=2, tile=8, dir=str(tmp_path / "m"))
    with caplog.at_level(logging.WARNING, logger="distill.train"):
        ds, _ = mosaics.get_or_build([(mixed, "img")], cfg, seed=0, accelerator=_OneProcess())
    assert any("data.train[0] row 1 does not decode" in r.message for r in caplog.records)
    assert all(np.asarray(decode_image(ds[i]["image"]))[..., 1].min() > 200 for i in range(6))  # all green
    broken = _images([{"bytes": b"junk", "path": "x.png"}])
    bad = MosaicConfig(count=1, tile=8, dir=str(tmp_path / "bad"))
    with pytest.raises(ImageDecodeError, match=r"data.train\[0\] rows 0.. \(1 tried\) do not decode"):
        mosaics.get_or_build([(broken, "img")], bad, seed=0, accelerator=_OneProcess())
    assert list((tmp_path / "bad").iterdir()) == []  # no half-written entry is left to be taken for one


def test_frames_are_written_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(mosaics, "CHUNK", 2)
    red = _images([_solid((255, 0, 0))] * 3)
    ds, _ = mosaics.get_or_build([(red, "img")], MosaicConfig(count=5, tile=8, dir=str(tmp_path)), 0, _OneProcess())
    (entry,) = tmp_path.iterdir()
    assert sorted(p.name for p in entry.glob("*.parquet")) == [f"train-0000{i}-of-00003.parquet" for i in range(3)]
    assert len(ds) == 5


def test_a_run_that_finishes_the_same_entry_first_wins(tmp_path, monkeypatch):
    red = _images([_solid((255, 0, 0))] * 3)
    cfg = MosaicConfig(count=2, tile=8, dir=str(tmp_path))
    real = mosaics.write_mosaics

    def racing(parts, cfg, seed, out):  # another run renames the same entry into place meanwhile
        real(parts, cfg, seed, out.with_name("other"))
        out.with_name("other").rename(Path(cfg.dir) / mosaics.mosaic_key([red._fingerprint], cfg, seed))
        real(parts, cfg, seed, out)

    monkeypatch.setattr(mosaics, "write_mosaics", racing)
    ds, _ = mosaics.get_or_build([(red, "img")], cfg, 0, _OneProcess())
    assert len(ds) == 2 and [p.name for p in tmp_path.iterdir()] == [mosaics.mosaic_key([red._fingerprint], cfg, 0)]


def test_mixture_trains_on_mosaics_as_one_more_cached_source(mixture, tmp_path, caplog):  # noqa: F811
    extra = ("data.mosaics.count=6", "data.mosaics.tile=16", f"data.mosaics.dir={tmp_path / 'mosaics'}")
    main(_general_args(mixture, tmp_path, *extra))
    caplog.clear()
    entries = {json.loads((p / "meta.json").read_text())["num_rows"] for p in (tmp_path / "cache").iterdir()}
    assert entries == {16, 12, 6, 0}  # each source, the mosaics, the vocabulary's texts
    with caplog.at_level(logging.INFO, logger="distill.train"):
        main(_general_args(mixture, tmp_path, *extra, f"output_dir={tmp_path / 'again'}"))
    messages = [r.message for r in caplog.records]
    assert sum(m.startswith("teacher-target cache hit") for m in messages) == 3, messages
    assert not any(m.startswith("mosaics: composing") for m in messages)


def test_two_processes_build_the_mosaics_once_and_share_them(mixture, tmp_path):  # noqa: F811
    """The main process composes, the other waits and loads the same frames (gloo, torchrun)."""
    from tests.test_general import torchrun_train

    proc = torchrun_train(_general_args(mixture, tmp_path, "data.mosaics.count=8", "data.mosaics.tile=16", "cpu=true",
                                        f"data.mosaics.dir={tmp_path / 'mosaics'}", "optim.max_steps=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("mosaics: composing") == 1, proc.stderr[-3000:]
    assert [p.name.endswith(".tmp") for p in (tmp_path / "mosaics").iterdir()] == [False]
    entries = {json.loads((p / "meta.json").read_text())["num_rows"] for p in (tmp_path / "cache").iterdir()}
    assert entries == {16, 12, 8, 0}
    assert (tmp_path / "out" / "final").is_dir()
