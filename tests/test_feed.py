"""Feeding the training loop: the pre-decoded pixel store and persistent DataLoader workers
give exactly the batches (and so the loss curve) of the plain decoding path."""

import json

import pytest
import torch

from distill.config import ConfigError
from clipcore.testing import make_tiny_clip
from distill.train import main
from tests.datagen import write_labelled


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("feed")
    teacher = make_tiny_clip(root / "teacher", seed=1)
    data = root / "data"
    data.mkdir()
    write_labelled(data, n=40)  # grayscale rows and a corrupt row 3
    return root, teacher, data


def _args(setup, out, *extra):
    root, teacher, data = setup
    recipe = root / "empty.yaml"
    recipe.write_text("{}\n")
    return ["--config", str(recipe), f"teacher.name_or_path={teacher}", f"data.train={data}",
            "student.arch=test-tiny-resnet", "optim.batch_size=8", "optim.warmup_steps=1", "log_every=1",
            "progress=false", "data.eval_limit=8", f"output_dir={out}", f"cache.dir={setup[0] / 'cache'}",
            "data.student_flip=true", "data.student_shift=2", *extra]


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_store_batches_equal_decoded_batches(setup, tmp_path):
    from accelerate import Accelerator

    from distill.config import load_config
    from clipcore.data import collate
    from distill.feed import make_feeder
    from distill.train import build_task

    cfg = load_config(None, _args(setup, tmp_path / "o")[2:] + ["data.pixel_store=true"])
    accelerator = Accelerator(cpu=True)
    _, data = build_task(cfg, accelerator)
    feeder = make_feeder(cfg, data, accelerator)
    assert feeder.store is not None and not feeder.store.substitute.equal(torch.arange(40))  # row 3 is replaced
    rows = [1, 2, 3, 4, 5, 20, 39, 0]
    got = feeder.to_device(feeder._store_batch(rows))
    want = collate([data.rows[i] for i in rows])
    assert torch.equal(got["index"], want["index"]) and 3 not in got["index"].tolist()
    assert torch.equal(got["pixel_values_student"], want["pixel_values_student"])  # bit for bit
    assert torch.equal(got["teacher_image"], data.teacher_images[want["index"], 0])


def test_pixel_store_and_persistent_workers_train_exactly_like_decoding(setup, tmp_path):
    # 40 rows / batch 8 = 5 steps an epoch: 12 steps cross two epoch boundaries
    common = ("optim.max_steps=12",)
    main(_args(setup, tmp_path / "decode", *common, "data.pixel_store=false"))
    main(_args(setup, tmp_path / "store", *common, "data.pixel_store=true"))
    assert (setup[0] / "pixel-store").is_dir()
    assert _losses(tmp_path / "store") == _losses(tmp_path / "decode")


def test_workers_carry_the_epoch_of_augmented_views(setup, tmp_path):
    # cache.views=3: each epoch picks other views, so a worker with a stale epoch would differ
    common = ("optim.max_steps=12", "cache.views=3", "data.student_flip=false", "data.student_shift=0")
    main(_args(setup, tmp_path / "main", *common))
    main(_args(setup, tmp_path / "workers", *common, "data.num_workers=2", "data.prefetch_factor=2"))
    assert _losses(tmp_path / "workers") == _losses(tmp_path / "main")


def test_forced_pixel_store_says_why_it_cannot_be_used(setup, tmp_path):
    with pytest.raises(ConfigError, match="cache.enabled=false"):
        main(_args(setup, tmp_path / "x", "optim.max_steps=1", "data.pixel_store=true", "cache.enabled=false"))


class _OneProcess:
    """What get_or_build needs of an Accelerator, for one process."""

    is_local_main_process = True

    def local_main_process_first(self):
        import contextlib

        return contextlib.nullcontext()


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def _flip(path):
    import numpy as np

    arr = np.load(path, mmap_mode="r+")
    arr[5] = 255 - arr[5]
    arr.flush()


@pytest.mark.parametrize("damage", [_truncate, _flip])
def test_a_damaged_pixel_store_is_rebuilt_with_a_warning(setup, tmp_path, caplog, damage):
    """Issue 28 item 11: a truncated pixels.npy failed every later run (`mmap length is greater than
    file size`, no path); a same-size corrupted one was used."""
    import logging

    import numpy as np

    from clipcore.data import DataSpec, load_hf_dataset
    from clipcore.imaging import ImageTransform
    from distill import pixel_store

    ds = load_hf_dataset(DataSpec(str(setup[2]), split="train"))
    transform = ImageTransform(size=16, crop_size=(16, 16))
    first = pixel_store.get_or_build(ds, "image", transform, tmp_path, "data", _OneProcess())
    want = np.array(first.pixels)
    damage(first.path / "pixels.npy")
    with caplog.at_level(logging.WARNING, logger="distill.train"):
        again = pixel_store.get_or_build(ds, "image", transform, tmp_path, "data", _OneProcess())
    assert f"pixel store {first.path}: " in caplog.text and "rebuilding it" in caplog.text, caplog.text
    np.testing.assert_array_equal(again.pixels, want)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="distill.train"):
        pixel_store.get_or_build(ds, "image", transform, tmp_path, "data", _OneProcess())
    assert "rebuilding" not in caplog.text  # healthy again


def test_order_seed_reorders_the_batches_from_the_same_start(setup, tmp_path):
    """order_seed changes the batches and the jitter, not the initial weights (what distill.soup averages);
    order_seed equal to seed is the run `seed` alone gives."""
    from safetensors.torch import load_file

    common = ("optim.max_steps=3", "optim.lr=1e-12", "seed=4")
    for name, extra in (("base", ()), ("same", ("order_seed=4",)), ("other", ("order_seed=5",))):
        main(_args(setup, tmp_path / name, *common, *extra))
    assert _losses(tmp_path / "same") == _losses(tmp_path / "base") != _losses(tmp_path / "other")
    base, other = (load_file(tmp_path / n / "final" / "model.safetensors") for n in ("base", "other"))
    head = [k for k in base if k.endswith("head.weight")]
    assert head and all(torch.allclose(base[k], other[k], atol=1e-6) for k in head)  # lr 1e-12: still the init
    with pytest.raises(ConfigError, match=r"order_seed=-1; expected null or an integer"):
        main(_args(setup, tmp_path / "x", "order_seed=-1"))
