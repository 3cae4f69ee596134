"""The trainer end to end on tiny models: in-process main(), resume after SIGKILL, the cache, NaN stops."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipcore.testing import free_port, make_tiny_clip, write_byte_tokenizer
from distill.config import ConfigError, DataConfig, TeacherConfig, TrainConfig
from distill.train import NonFiniteLossError, main
from tests.datagen import write_captions, write_labelled

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    teacher = make_tiny_clip(root / "teacher", seed=1)  # seed differs from the student's init seed
    data = root / "data"
    data.mkdir()
    write_labelled(data, n=48)
    return root, teacher, data


def _args(setup, tmp_path, *extra):
    root, teacher, data = setup
    recipe = root / "empty.yaml"  # dataclass defaults, not the default recipe's ViT-B/32 teacher
    recipe.write_text("{}\n")
    return ["--config", str(recipe), f"teacher.name_or_path={teacher}", f"data.train={data}", "student.arch=test-tiny",
            "optim.batch_size=8", "optim.warmup_steps=1", "log_every=1", "progress=false",
            f"output_dir={tmp_path / 'out'}", f"cache.dir={tmp_path / 'cache'}", *extra]


def _log(tmp_path):
    return [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]


def test_overfits_one_batch_and_saves_a_loadable_student(setup, tmp_path):
    root, teacher, data = setup
    one_batch = tmp_path / "one"
    one_batch.mkdir()
    write_labelled(one_batch, n=8)
    metrics = main(_args(setup, tmp_path, f"data.train={one_batch}", "optim.max_steps=40", "optim.lr=3e-3"))
    log = _log(tmp_path)
    first, last = (sum(r["loss"] for r in rows) / 5 for rows in (log[:5], log[-5:]))
    # prompts are re-drawn every step, so the curve is noisy: compare five-step means
    assert len(log) == 40 and last < 0.7 * first, (first, last)
    assert log[-1]["feature_image_loss"] < 0.3 * log[0]["feature_image_loss"]
    assert {"kl_class_loss", "kl_affinity_loss", "feature_image_loss", "feature_text_loss"} <= set(log[0])
    assert 0 <= metrics["eval/zeroshot_top1"] <= 1
    final = tmp_path / "out" / "final"
    from transformers import CLIPModel

    CLIPModel.from_pretrained(final)  # a plain transformers checkpoint
    card = (final / "README.md").read_text()
    assert str(teacher) in card and str(one_batch) in card and "eval/zeroshot_top1" in card
    assert (final / "training_config.yaml").is_file()


def test_evaluations_reach_tensorboard_at_their_steps(setup, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    main(_args(setup, tmp_path, "optim.max_steps=4", "eval_every=2", "data.eval_limit=8"))
    runs = [EventAccumulator(str(f)) for f in (tmp_path / "out" / "tb").rglob("events.out.tfevents.*")]
    (acc,) = [a for a in runs if "eval/zeroshot_top1" in a.Reload().Tags()["scalars"]]
    # every 2 steps during training, then the final evaluation at step 4
    assert [s.step for s in acc.Scalars("eval/zeroshot_top1")] == [2, 4]
    assert [s.step for s in acc.Scalars("loss")][-1] == 4


def test_teacher_stays_frozen_and_in_eval_mode(setup):
    from clipcore.loading import load_teacher
    from distill.config import LossConfig
    from distill.task import DistillTask, TextBank
    from students import build_student

    _, teacher_dir, _ = setup
    teacher = load_teacher(str(teacher_dir))
    student = build_student("test-tiny", teacher=teacher)
    tokens = student.tokenize(["a photo of a cat.", "a photo of a dog."])
    bank = TextBank(["a photo of a cat.", "a photo of a dog."], tokens["input_ids"], tokens["attention_mask"],
                    teacher.encode_text(["a photo of a cat.", "a photo of a dog."]), torch.arange(2).view(2, 1), [])
    task = DistillTask(student, teacher, LossConfig(), bank, None)
    task.train()
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    assert not any(n.startswith("_teacher") for n, _ in task.named_parameters())
    batch = {"pixel_values_student": torch.randn(2, 3, 32, 32), "pixel_values_teacher": torch.randn(2, 3, 32, 32),
             "index": torch.arange(2)}
    task(batch, step=0)["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in student.parameters())


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_precisions_and_accumulation(setup, tmp_path, precision):
    main(_args(setup, tmp_path, f"mixed_precision={precision}", "optim.max_steps=2", "optim.grad_accum=2",
               "cache.enabled=false", "loss.feature_kind=mse"))
    log = _log(tmp_path)
    assert [r["step"] for r in log] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    caps = tmp_path_factory.mktemp("caps")
    write_captions(caps, n=16)
    return caps


@pytest.mark.parametrize("arch", ["test-tiny-vision", "test-tiny-resnet"])
def test_image_only_students_use_the_teachers_text(setup, captions, tmp_path, arch):
    main(_args(setup, tmp_path, f"student.arch={arch}", "optim.max_steps=3", "loss.clip_weight=1.0",
               "loss.interactive_weight=1.0", f"data.train={captions}", "data.eval_split=train",
               "loss.kl_on_classes=false"))
    final = tmp_path / "out" / "final"
    meta = json.loads((final / "student.json").read_text())
    assert "text" not in " ".join(load_file(str(final / "model.safetensors")))  # the teacher's text tower is not saved
    assert meta


def test_different_tokenizer_and_image_size(setup, tmp_path):
    tok_dir = tmp_path / "tok"
    write_byte_tokenizer(tok_dir, max_length=20)
    main(_args(setup, tmp_path, f"student.tokenizer={tok_dir}", "student.image_size=16", "optim.max_steps=2"))
    cfg = json.loads((tmp_path / "out" / "final" / "config.json").read_text())
    assert cfg["vision_config"]["image_size"] == 16 and cfg["text_config"]["max_position_embeddings"] == 20


def test_contrastive_losses_on_captions(tmp_path, setup, captions):
    main(_args(setup, tmp_path, f"data.train={captions}", "data.eval_split=train", "optim.max_steps=2",
               "loss.kl_on_classes=false", "loss.clip_weight=0.5", "loss.interactive_weight=0.5"))
    log = _log(tmp_path)
    assert len(log) == 2 and {"clip_loss", "interactive_loss", "kl_affinity_loss"} <= set(log[0])


def test_contrastive_losses_need_paired_text(setup, tmp_path):
    with pytest.raises(ConfigError, match="need image-text pairs"):
        main(_args(setup, tmp_path, "loss.clip_weight=1.0"))


def test_unknown_key_lists_valid_keys(setup, tmp_path):
    with pytest.raises(ConfigError, match=r"'lrr' is not one of \['lr', 'weight_decay'"):
        main(_args(setup, tmp_path, "optim.lrr=1"))


def test_nan_loss_stops_with_step_and_term_and_keeps_checkpoint(setup, tmp_path, monkeypatch):
    from distill import task as task_mod

    forward = task_mod.DistillTask.forward

    def poisoned(self, batch, step, seed=0):
        out = forward(self, batch, step, seed)
        if step >= 3:
            out["feature_image_loss"] = out["feature_image_loss"] * float("nan")
        return out

    monkeypatch.setattr(task_mod.DistillTask, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"step 3: non-finite loss \(feature_image_loss=nan\).*step-2"):
        main(_args(setup, tmp_path, "optim.max_steps=6", "save_every=2"))
    assert (tmp_path / "out" / "checkpoints" / "step-2" / "trainer_state.json").is_file()


def test_cache_hit_miss_and_invalidation(setup, tmp_path):
    from accelerate import Accelerator

    from clipcore.loading import load_teacher
    from distill.config import load_config
    from distill.train_data import build_train_data
    from students import build_student

    root, teacher_dir, data = setup
    acc = Accelerator(cpu=True)

    def run(teacher, *extra):
        cfg = load_config(None, _args(setup, tmp_path, *extra)[2:])
        student = build_student("test-tiny", teacher=teacher)
        return build_train_data(cfg.data, cfg.cache, cfg.loss, teacher, student, acc, seed=cfg.seed,
                                batch_size=cfg.optim.batch_size)

    teacher = load_teacher(str(teacher_dir))
    first = run(teacher)
    assert first.cache_hit is False
    again = run(teacher)
    assert again.cache_hit is True
    torch.testing.assert_close(first.teacher_images, again.teacher_images)
    # cached targets equal the online teacher's embeddings (float16 storage)
    ds_item = again.rows[5]
    online = teacher.encode_image(_teacher_pixels(teacher, data, ds_item["index"]))
    torch.testing.assert_close(again.teacher_images[ds_item["index"], 0], online[0], atol=2e-3, rtol=0)
    assert run(teacher, "data.train_limit=40").cache_hit is False  # other data
    other_teacher = load_teacher(str(make_tiny_clip(tmp_path / "t2", seed=2)))
    assert run(other_teacher).cache_hit is False  # other teacher
    from dataclasses import replace

    teacher.image_transform = replace(teacher.image_transform, resample="bilinear")
    assert run(teacher).cache_hit is False  # other preprocessing
    entries = [p for p in (tmp_path / "cache").iterdir() if (p / "meta.json").is_file()]
    assert len(entries) == 4
    # a half-written entry (no meta.json) is rebuilt, never read
    (entries[0] / "meta.json").unlink()
    assert not any(p.name == "meta.json" for p in entries[0].iterdir())


def _teacher_pixels(teacher, data, index):
    from clipcore.data import DataSpec, ImageDataset

    ds = ImageDataset.from_spec(DataSpec(path=str(data), split="train"), {"t": teacher.image_transform})
    return ds[int(index)]["pixel_values_t"][None]


def _run_cli(setup, tmp_path, out, *extra, wait=True):
    cmd = [sys.executable, str(REPO / "distill" / "train.py"), *_args(setup, tmp_path, f"output_dir={out}", *extra)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    if wait:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_resume_after_sigkill_gives_identical_weights(setup, tmp_path):
    common = ("optim.max_steps=14", "save_every=4", "optim.lr=2e-3")
    _run_cli(setup, tmp_path, tmp_path / "straight", *common)
    victim = _run_cli(setup, tmp_path, tmp_path / "killed", *common, wait=False)
    marker = tmp_path / "killed" / "checkpoints" / "step-4" / "trainer_state.json"
    deadline = time.time() + 240
    while not marker.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    killed = victim.poll() is None
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert killed, "the run ended before it could be killed"
    assert not (tmp_path / "killed" / "final").exists()
    _run_cli(setup, tmp_path, tmp_path / "killed", *common, "resume=latest")
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ema_is_what_is_saved_and_resumes(setup, tmp_path):
    """optim.ema_decay: every step's checkpoint holds the live weights and the average; the average follows them by
    hand, is what final/ holds, and a run resumed from an earlier checkpoint continues it to the same final."""
    from distill.ema import EMA_FILE
    from students.checkpoint import load_student

    decay = 0.8
    main(_args(setup, tmp_path, "optim.max_steps=4", "save_every=1", "keep_checkpoints=10", "optim.lr=2e-3",
               f"optim.ema_decay={decay}"))
    ckpts = tmp_path / "out" / "checkpoints"
    expected = None
    for step in (1, 2, 3, 4):
        live = {k[len("student."):]: v for k, v in load_file(str(ckpts / f"step-{step}" / "model.safetensors")).items()
                if k.startswith("student.") and v.is_floating_point()}
        expected = live if expected is None else {k: decay * expected[k] + (1 - decay) * v for k, v in live.items()}
        ema = load_file(str(ckpts / f"step-{step}" / EMA_FILE))
        assert int(ema["n_averaged"]) == step
        for k, v in expected.items():
            torch.testing.assert_close(ema["module." + k], v, msg=f"step {step}: {k}")
    moved = [k for k in expected if not torch.equal(ema["module." + k], live[k])]
    assert moved, "the average equals the live weights: nothing was averaged"
    final = load_student(tmp_path / "out" / "final").state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(final[k], ema["module." + k], rtol=0, atol=0, msg=k)
    # resume from step 2: the average must continue from the checkpoint's, not restart from the live weights
    saved = load_file(str(tmp_path / "out" / "final" / "model.safetensors"))
    shutil.rmtree(tmp_path / "out" / "final")
    for step in (3, 4):
        shutil.rmtree(ckpts / f"step-{step}")
    main(_args(setup, tmp_path, "optim.max_steps=4", "save_every=1", "keep_checkpoints=10", "optim.lr=2e-3",
               f"optim.ema_decay={decay}", "resume=latest"))
    again = load_file(str(tmp_path / "out" / "final" / "model.safetensors"))
    assert saved.keys() == again.keys()
    for k in saved:
        assert torch.equal(saved[k], again[k]), k


def test_two_cpu_processes(setup, captions, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "distill" / "train.py"),
           *_args(setup, tmp_path, f"output_dir={out}", "optim.max_steps=3", "optim.batch_size=4", "cpu=true",
                  "loss.clip_weight=1.0", f"data.train={captions}", "data.eval_split=train",
                  "loss.kl_on_classes=false", "optim.ema_decay=0.5")]
    proc = subprocess.run(cmd, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "final" / "model.safetensors").is_file()
    assert len(list((out / "checkpoints" / "step-3").glob("random_states_*.pkl"))) == 2  # one per process
    assert (out / "checkpoints" / "step-3" / "ema_student.safetensors").is_file()  # written once, by the main process


def test_augmented_views_are_deterministic_and_match_the_cache(setup, tmp_path):
    from accelerate import Accelerator

    from clipcore.augment import ViewSpec
    from clipcore.loading import load_teacher
    from distill.config import load_config
    from distill.train_data import build_train_data
    from students import build_student

    spec = ViewSpec(views=3, seed=5)
    assert spec.box(7, 0, 40, 30) == ((0, 0, 40, 30), False)
    assert spec.box(7, 2, 40, 30) == ViewSpec(views=3, seed=5).box(7, 2, 40, 30)  # same in any process
    assert {spec.box(r, 1, 40, 30) for r in range(10)} != {spec.box(0, 1, 40, 30)}
    assert {spec.view_for(r, 0) for r in range(30)} == {0, 1, 2}
    _, teacher_dir, data = setup
    teacher = load_teacher(str(teacher_dir))
    cfg = load_config(None, _args(setup, tmp_path, "cache.views=3", "seed=5")[2:])
    built = build_train_data(cfg.data, cfg.cache, cfg.loss, teacher, build_student("test-tiny", teacher=teacher),
                             Accelerator(cpu=True), seed=cfg.seed, batch_size=cfg.optim.batch_size)
    assert built.teacher_images.shape == (48, 3, teacher.embed_dim)
    # view 2 of row 5 in the cache == the teacher on that crop of the decoded image
    from clipcore.data import DataSpec, ImageDataset

    raw = ImageDataset.from_spec(DataSpec(path=str(data), split="train"), {"t": teacher.image_transform})
    raw.view = lambda image, row: spec.apply(image, row, 2)
    online = teacher.encode_image(raw[5]["pixel_values_t"][None])[0]
    torch.testing.assert_close(built.teacher_images[5, 2], online, atol=2e-3, rtol=0)
    assert not torch.allclose(built.teacher_images[5, 0], built.teacher_images[5, 2], atol=1e-2)
    built.rows.epoch = 1
    item = built.rows[5]
    assert item["view"] == spec.view_for(item["index"], 1)


def test_training_with_cached_views(setup, tmp_path):
    main(_args(setup, tmp_path, "cache.views=2", "optim.max_steps=7"))  # 7 steps cross an epoch boundary
    assert len(_log(tmp_path)) == 7


def test_cpu_threads_are_shared_out_over_local_processes(monkeypatch):
    # accelerate launch exports OMP_NUM_THREADS=1; a CPU run takes its share of the cores back
    from types import SimpleNamespace

    from distill.config import TrainConfig
    from distill.train import set_cpu_threads

    cpu = SimpleNamespace(device=torch.device("cpu"), num_processes=1)
    before = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)))
    try:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert set_cpu_threads(TrainConfig(), cpu) == 2 and torch.get_num_threads() == 2
        assert set_cpu_threads(TrainConfig(cpu_threads=1), cpu) == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv("LOCAL_WORLD_SIZE")
        assert set_cpu_threads(TrainConfig(), cpu) == 4 and torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)
    assert set_cpu_threads(TrainConfig(), SimpleNamespace(device=torch.device("cuda"), num_processes=1)) is None
    with pytest.raises(ConfigError, match="cpu_threads=0"):
        TrainConfig(cpu_threads=0).validate()


def test_student_jitter_flips_and_shifts_whole_images():
    from clipcore.augment import StudentJitter

    x = torch.randn(16, 3, 8, 8)
    flipped = StudentJitter(flip=True)(x, torch.Generator().manual_seed(0))
    same = [torch.equal(a, b) for a, b in zip(flipped, x)]
    mirrored = [torch.equal(a, b.flip(-1)) for a, b in zip(flipped, x)]
    assert all(s != m for s, m in zip(same, mirrored)) and 0 < sum(same) < 16
    shifted = StudentJitter(shift=2)(x, torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    windows = [{(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(s, p[:, dy:dy + 8, dx:dx + 8])}
               for s, p in zip(shifted, padded)]
    assert all(windows) and len(set.union(*windows)) > 3  # each image is one window; offsets vary
    assert torch.equal(shifted, StudentJitter(shift=2)(x, torch.Generator().manual_seed(1)))
    assert not StudentJitter() and StudentJitter(shift=1)
    with pytest.raises(ValueError, match="student_shift"):
        StudentJitter(shift=-1)


def test_student_lowres_jitter_blurs_a_share_of_whole_images():
    from clipcore.augment import StudentJitter

    x = torch.randn(64, 3, 16, 16)
    out = StudentJitter(lowres=0.5, lowres_min=4)(x, torch.Generator().manual_seed(0))
    kept = [torch.equal(a, b) for a, b in zip(out, x)]
    assert 16 < sum(kept) < 48  # about half the images are replaced, the rest untouched
    changed = out[[not k for k in kept]]
    # a low-resolution copy of noise loses most of its high frequencies: far less variance
    assert changed.var() < 0.6 * x.var() and changed.shape[1:] == x.shape[1:]
    flat = torch.full((4, 3, 16, 16), 0.25)
    torch.testing.assert_close(StudentJitter(lowres=1.0, lowres_min=4)(flat, torch.Generator()), flat)
    assert torch.equal(StudentJitter(lowres=1.0, lowres_min=16)(x, torch.Generator()), x)  # no smaller side
    assert StudentJitter(lowres=0.1) and not StudentJitter(lowres=0.0)
    with pytest.raises(ValueError, match="student_lowres"):
        StudentJitter(lowres=1.5)
    with pytest.raises(ConfigError, match="data.student_lowres"):
        TrainConfig(teacher=TeacherConfig(name_or_path="t"), data=DataConfig(train="x", student_lowres=-0.1)).validate()


def test_per_row_lowres_keeps_the_draws_and_changes_only_the_rows_it_names():
    """lowres_rows (a mixture's per-source student_lowres): rows at 0 stay sharp, rows at 1 are all blurred,
    and rows at the global share get exactly the images the global share would have given them."""
    from clipcore.augment import StudentJitter

    x = torch.randn(64, 3, 16, 16)
    rows = torch.arange(64).flip(0) + 100  # dataset rows 163..100, not batch positions
    shares = torch.full((200,), 0.5)
    shares[100:132] = 0.0  # the batch's last 32 images (rows 131..100) come from a source kept sharp
    shares[148:] = 1.0  # and its first 16 (rows 163..148) from a source always reduced
    per_row = StudentJitter(flip=True, shift=1, lowres=0.5, lowres_min=4, lowres_rows=shares)
    out = per_row(x, torch.Generator().manual_seed(3), rows)
    same = StudentJitter(flip=True, shift=1, lowres=0.5, lowres_min=4)(x, torch.Generator().manual_seed(3))
    middle = (shares[rows] == 0.5).nonzero().squeeze(1)
    assert torch.equal(out[middle], same[middle])  # the same draws: flips and shifts included
    blur = StudentJitter(lowres=0.5, lowres_min=4, lowres_rows=shares)
    lowres = blur(x, torch.Generator().manual_seed(3), rows)
    sharp = rows < 132
    assert sharp.sum() == 32 and torch.equal(lowres[sharp], x[sharp])
    assert all(not torch.equal(a, b) for a, b in zip(lowres[rows >= 148], x[rows >= 148]))
    assert len(middle) == 16 and torch.equal(lowres[middle], StudentJitter(lowres=0.5, lowres_min=4)(
        x, torch.Generator().manual_seed(3))[middle])
    assert StudentJitter(lowres=0.0, lowres_rows=shares) and not StudentJitter(lowres=0.3, lowres_rows=shares * 0)
    with pytest.raises(ValueError, match="row of every image"):
        blur(x, torch.Generator(), None)
    with pytest.raises(ValueError, match=r"student_lowres are probabilities"):
        StudentJitter(lowres_rows=shares + 1)


def test_jitter_reaches_the_student_only_and_only_in_training(setup):
    from clipcore.augment import StudentJitter
    from clipcore.loading import load_teacher
    from distill.config import LossConfig
    from distill.task import DistillTask, TextBank
    from students import build_student

    teacher = load_teacher(str(setup[1]))
    student = build_student("test-tiny", teacher=teacher)
    tokens = student.tokenize(["a cat.", "a dog."])
    bank = TextBank(["a cat.", "a dog."], tokens["input_ids"], tokens["attention_mask"],
                    teacher.encode_text(["a cat.", "a dog."]), torch.arange(2).view(2, 1), [])
    task = DistillTask(student, teacher, LossConfig(), bank, None, jitter=StudentJitter(flip=True, shift=3))
    seen = {}
    for who, model in (("student", student), ("teacher", teacher)):
        encode = model.encode_image
        model.encode_image = lambda px, who=who, encode=encode: seen.__setitem__(who, px) or encode(px)
    pixels = torch.randn(4, 3, 32, 32)
    batch = {"pixel_values_student": pixels, "pixel_values_teacher": pixels.clone(), "index": torch.arange(4) % 2}
    task.train()(batch, step=0)
    assert not torch.equal(seen["student"], pixels) and torch.equal(seen["teacher"], pixels)
    with torch.no_grad():
        task.eval()(batch, step=0)
    assert torch.equal(seen["student"], pixels)


def test_training_with_student_jitter(setup, tmp_path):
    main(_args(setup, tmp_path, "data.student_flip=true", "data.student_shift=2", "optim.max_steps=3"))
    assert len(_log(tmp_path)) == 3
    with pytest.raises(ConfigError, match="data.student_shift"):
        main(_args(setup, tmp_path, "data.student_shift=-2"))
    with pytest.raises(ConfigError, match="mode=contrastive"):
        main(_args(setup, tmp_path, "mode=contrastive", f"contrastive.model={setup[1]}", "data.student_flip=true"))


def test_image_only_student_owns_its_logit_scale(setup):
    """One owner: the task trains the student's own log scale (no copy kept in the task)."""
    from clipcore.loading import load_teacher
    from distill.config import LossConfig
    from distill.task import DistillTask, TextBank
    from students import build_student

    teacher = load_teacher(str(setup[1]))
    student = build_student("test-tiny-resnet", teacher=teacher)
    assert not student.has_own_text_tower
    bank = TextBank(["a cat.", "a dog."], None, None, teacher.encode_text(["a cat.", "a dog."]),
                    torch.arange(2).view(2, 1), [])
    task = DistillTask(student, teacher, LossConfig(), bank, teacher.encode_text(["a cat.", "a dog."]))
    scales = [n for n, _ in task.named_parameters() if "scale" in n]
    assert scales == ["student.log_scale"], scales
    batch = {"pixel_values_student": torch.randn(4, 3, 32, 32), "pixel_values_teacher": torch.randn(4, 3, 32, 32),
             "index": torch.arange(4) % 2}
    task.train()(batch, step=0)["loss"].backward()
    assert student.log_logit_scale.grad is not None and task.export_student() is student


def test_export_variants_and_gates_are_typed(tmp_path):
    """export.variants is a list and export.gates a map; the comma forms stay a command-line convenience."""
    from distill.config import load_config

    base = ["teacher.name_or_path=t", "data.train=d"]
    cfg = load_config(None, [*base, "export.variants=fp32,int8-dynamic",
                             "export.gates=int8.min_agreement=0.98,fp16.max_kl=none"])
    assert cfg.export.variants == ["fp32", "int8-dynamic"]
    assert cfg.export.gates == {"int8": {"min_agreement": 0.98}, "fp16": {"max_kl": None}}
    recipe = tmp_path / "r.yaml"
    recipe.write_text("export:\n  variants: [fp16]\n  gates:\n    int8: {max_top1_drop: 0.02}\n")
    cfg = load_config(recipe, base)
    assert cfg.export.variants == ["fp16"] and cfg.export.gates == {"int8": {"max_top1_drop": 0.02}}
    with pytest.raises(ConfigError, match=r"export: unknown variants \['fp8'\]"):
        load_config(None, [*base, "export.variants=fp32,fp8"])
    with pytest.raises(ConfigError, match="unknown gate fields"):
        load_config(None, [*base, "export.gates=int8.min_agreemnt=0.9"])
    with pytest.raises(ConfigError, match="is not KEY.FIELD=VALUE"):
        load_config(None, [*base, "export.gates=int8=0.9"])


@pytest.mark.parametrize("override, expected", [
    ("export.gates=int9.min_agreement=0.9", r"export\.gates: gate 'int9': unknown gate key 'int9'; .*fp32, fp16, int8"),
    ("export.variants=", r"export: the variant list is empty.*\(export\.variants\)"),
])
def test_export_gates_with_unknown_keys_and_no_variants_are_config_errors(override, expected):
    """Issue 28 item 9: export.gates=int9.… gated nothing and the run passed."""
    from distill.config import load_config

    with pytest.raises(ConfigError, match=expected):
        load_config(None, ["teacher.name_or_path=t", "data.train=d", override])
