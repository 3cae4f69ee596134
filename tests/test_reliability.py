"""Issue 12 (items 1, 2, 6, 9): a run owns its output_dir, a diverged student is never saved, metrics
refuse NaN, checkpoints are verified before they are resumed, and config mistakes are one line, exit 2.
docs/reliability.md maps each promise to its test here."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from clipcore.testing import make_tiny_clip
from distill.train import cli, main
from tests.datagen import write_labelled

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    teacher = make_tiny_clip(root / "teacher", seed=1)
    data = root / "data"
    data.mkdir()
    write_labelled(data, n=48)
    (root / "empty.yaml").write_text("{}\n")
    return root, teacher, data


def _args(setup, out, *extra):
    root, teacher, data = setup
    return ["--config", str(root / "empty.yaml"), f"teacher.name_or_path={teacher}", f"data.train={data}",
            "student.arch=test-tiny", "optim.batch_size=8", "optim.warmup_steps=1", "log_every=1", "progress=false",
            "data.eval_limit=16", f"output_dir={out}", f"cache.dir={root / 'cache'}", *extra]


RUN = ("optim.max_steps=4", "save_every=2")  # checkpoints step-2 and step-4 (the final one)


@pytest.fixture(scope="module")
def finished(setup, tmp_path_factory):
    """A finished run with checkpoints step-2 and step-4, copied by each test that changes it."""
    out = tmp_path_factory.mktemp("finished") / "out"
    main(_args(setup, out, *RUN))
    return out


def _copy(finished, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    return out


def _steps(out):
    return [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def _ckpts(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir())


# ------------------------------------------------------------------ item 1: a run owns its output_dir


def test_fresh_run_refuses_checkpoints_of_another_config_unless_overwrite(setup, finished, tmp_path):
    out = _copy(finished, tmp_path)
    with pytest.raises(ValueError, match=r"another config.*optim\.lr \(checkpoint 0\.0005, this run 0\.001\).*overwrite=true"):
        main(_args(setup, out, *RUN, "optim.lr=1e-3"))
    assert _ckpts(out) == ["step-2", "step-4"]  # untouched
    main(_args(setup, out, "optim.max_steps=1", "optim.lr=1e-3", "overwrite=true"))
    assert _ckpts(out) == ["step-1"] and _steps(out) == [1]


def test_a_final_model_of_another_config_is_not_replaced_unless_overwrite(setup, finished, tmp_path):
    """Issue 28, item 3: with checkpoints/ deleted, a run of another config and architecture replaced
    final/ silently (exit 0)."""
    out = _copy(finished, tmp_path)
    shutil.rmtree(out / "checkpoints")
    recorded = (out / "final" / "training_config.yaml").read_text()
    with pytest.raises(ValueError, match=r"final/: .*optim\.lr \(final 0\.0005, this run 0\.001\); "
                                         r"student\.arch \(final 'test-tiny', this run 'test-tiny-vision'\)"):
        main(_args(setup, out, "optim.max_steps=1", "optim.lr=1e-3", "student.arch=test-tiny-vision"))
    assert (out / "final" / "training_config.yaml").read_text() == recorded  # untouched
    (out / "final" / "training_config.yaml").unlink()  # a final/ whose config is unknown is refused too
    with pytest.raises(ValueError, match=r"final/: unknown config: .*training_config.yaml is missing"):
        main(_args(setup, out, "optim.max_steps=1"))
    main(_args(setup, out, "optim.max_steps=1", "optim.lr=1e-3", "student.arch=test-tiny-vision", "overwrite=true"))
    assert "test-tiny-vision" in (out / "final" / "training_config.yaml").read_text()


def test_resume_refuses_another_config_naming_the_keys(setup, finished, tmp_path):
    out = _copy(finished, tmp_path)
    with pytest.raises(ValueError, match=r"cannot resume .*step-4.*loss\.kl_weight \(checkpoint 1\.0, this run 0\.5\); "
                                         r"student\.image_size"):
        main(_args(setup, out, "optim.max_steps=5", "loss.kl_weight=0.5", "student.image_size=16", "--resume", "latest"))
    # run-length and logging keys may change: 4 -> 5 steps, another log_every
    main(_args(setup, out, "optim.max_steps=5", "log_every=5", "--resume", "latest"))
    assert _steps(out) == [1, 2, 3, 4, 5]


def test_resume_at_max_steps_finishes_and_a_key_added_later_at_its_default_resumes(setup, finished, tmp_path):
    """A checkpoint at optim.max_steps used to fail (an unset epoch size); a config key the project gained
    after the checkpoint was written (absent from its manifest) blocked resuming even at its default."""
    out = _copy(finished, tmp_path)
    shutil.rmtree(out / "final")
    manifest = out / "checkpoints" / "step-4" / "manifest.json"
    recorded = json.loads(manifest.read_text())
    del recorded["config"]["qat"]["target"]  # as a checkpoint written before qat.target existed
    manifest.write_text(json.dumps(recorded))
    with pytest.raises(ValueError, match=r"qat\.target \(checkpoint '<absent>', this run 'self'\)"):
        main(_args(setup, out, "optim.max_steps=4", "qat.target=self", "--resume", "latest"))
    main(_args(setup, out, "optim.max_steps=4", "--resume", "latest"))  # no step left: the run only finishes
    assert (out / "final" / "model.safetensors").is_file() and _steps(out) == [1, 2, 3, 4]
    assert _ckpts(out) == ["step-2", "step-4"]


def _run_id(ckpt):
    return json.loads((ckpt / "manifest.json").read_text())["run_id"]


def test_pruning_keeps_other_runs_checkpoints_and_a_fresh_run_restarts_the_log(setup, finished, tmp_path):
    out = _copy(finished, tmp_path)
    first = _run_id(out / "checkpoints" / "step-4")
    # same config (only run-length keys differ), fresh: allowed; the first run's checkpoints are set
    # aside whole (never overwritten by a same-named one, never pruned), and it prunes only its own
    main(_args(setup, out, "optim.max_steps=3", "save_every=1"))
    assert _ckpts(out) == [f"previous-{first}", "step-2", "step-3"]  # step-1 pruned (keep 2)
    aside = out / "checkpoints" / f"previous-{first}"
    assert sorted(p.name for p in aside.iterdir()) == ["step-2", "step-4"]
    assert {_run_id(p) for p in aside.iterdir()} == {first}
    assert _run_id(out / "checkpoints" / "step-2") == _run_id(out / "checkpoints" / "step-3") != first
    assert _steps(out) == [1, 2, 3]


def test_resume_latest_never_splices_an_earlier_run(setup, finished, tmp_path, caplog):
    """Issue 28, item 4: an earlier run's step-4 and a fresh same-config run's step-2 in one directory;
    `--resume latest` took the earlier run's step-4 (a log of [1, 2, 5, ...]), and the fresh run
    overwrote the earlier run's step-2 with its own."""
    out = _copy(finished, tmp_path)  # the earlier run: step-2 and step-4
    first = _run_id(out / "checkpoints" / "step-4")
    main(_args(setup, out, "optim.max_steps=2", "save_every=1"))  # a fresh run (as if killed after step 2)
    assert _run_id(out / "checkpoints" / f"previous-{first}" / "step-2") == first  # not overwritten
    with caplog.at_level(logging.INFO, logger="distill.train"):
        main(_args(setup, out, "optim.max_steps=3", "--resume", "latest"))
    assert "at step 2" in caplog.text and _steps(out) == [1, 2, 3]
    assert _run_id(out / "checkpoints" / "step-3") != first




def test_a_second_live_run_is_refused_and_a_dead_runs_lock_is_taken_over(setup, tmp_path, caplog):
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "distill" / "train.py"), *_args(setup, out, "optim.max_steps=100000")]
    first = subprocess.Popen(cmd, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (out / "train_log.jsonl").is_file() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended early"
        with pytest.raises(ValueError, match=rf"in use by another run \(pid {first.pid} on "):
            main(_args(setup, out, "optim.max_steps=1"))
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (out / ".lock").is_file()  # left behind by the killed run
    with caplog.at_level(logging.WARNING, logger="distill.train"):
        main(_args(setup, out, "optim.max_steps=1"))
    assert f"stale lock of pid {first.pid}" in caplog.text
    assert not (out / ".lock").exists() and _steps(out) == [1]


# ------------------------------------------------------------ item 2: NaN never saved, never scored


def test_divergence_in_the_last_update_is_caught_before_final(setup, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(_args(setup, out, "optim.lr=1e8", "optim.max_steps=2")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: step 2: training diverged") and "Traceback" not in "\n".join(err)
    assert not (out / "final").exists() and not (out / "checkpoints" / "step-2").exists()


def test_finite_weights_with_nan_outputs_are_never_a_good_checkpoint(setup, tmp_path, capsys, monkeypatch):
    """Issue 28, item 5: the update of step 2 leaves finite weights whose outputs overflow to NaN.
    Before, step-2 was saved and the NaN loss of step 3 called it the last good checkpoint."""
    from distill import train as train_mod

    build = train_mod.build_optimizer

    def poisoning(task, cfg):
        optimizer = build(task, cfg)
        step, calls = optimizer.step, []

        def step_then_poison(self, *args, **kwargs):
            result = step(*args, **kwargs)
            calls.append(1)
            if len(calls) == 2:
                with torch.no_grad():
                    task.export_student().model.visual_projection.weight.fill_(3e38)  # finite; outputs are not
            return result

        optimizer.step = types.MethodType(step_then_poison, optimizer)  # the LR scheduler wraps a bound method
        return optimizer

    monkeypatch.setattr(train_mod, "build_optimizer", poisoning)
    out = tmp_path / "out"
    assert cli(_args(setup, out, *RUN)) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: step 2: training diverged: the student's image embeddings are NaN or inf"), err
    assert "Last good checkpoint: none yet" in err
    assert not (out / "checkpoints" / "step-2").exists() and not (out / "final").exists()


def test_metrics_refuse_non_finite_inputs():
    from clipcore.linear_probe import linear_probe
    from clipcore.metrics import NonFiniteError, classification_metrics, retrieval_metrics, topk_accuracy

    logits = torch.randn(6, 3)
    logits[2, 1] = float("nan")
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    for call in (lambda: classification_metrics(logits, labels), lambda: topk_accuracy(logits, labels, 1),
                 lambda: classification_metrics(logits.nan_to_num(posinf=0.0) + torch.tensor(float("inf")), labels),
                 lambda: retrieval_metrics(torch.full((3, 4), float("nan")), torch.randn(3, 4), [0, 1, 2]),
                 lambda: linear_probe(logits.numpy(), labels.numpy(), logits.numpy(), labels.numpy())):
        with pytest.raises(NonFiniteError, match="NaN or inf"):
            call()


def test_evaluate_refuses_a_nan_model(tmp_path, capsys):
    from transformers import CLIPModel

    from distill.evaluate import cli as evaluate_cli

    model_dir = make_tiny_clip(tmp_path / "nan")
    model = CLIPModel.from_pretrained(model_dir)
    with torch.no_grad():
        model.visual_projection.weight.fill_(float("nan"))
    model.save_pretrained(model_dir)
    data = tmp_path / "data"
    data.mkdir()
    write_labelled(data, n=8)
    assert evaluate_cli(["--model", str(model_dir), "--data", str(data), "--split", "train", "--no-progress"]) == 2
    assert "error: logits: " in capsys.readouterr().err


# ------------------------------------------------------------------- item 6: verified checkpoints


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated-weights": lambda d: _truncate(d / "model.safetensors"),
    "truncated-optimizer": lambda d: _truncate(d / "optimizer.bin"),
    "garbage-state": lambda d: (d / "trainer_state.json").write_text("{not json"),
    "flipped-byte": lambda d: _flip_byte(d / "model.safetensors"),
    "no-manifest": lambda d: (d / "manifest.json").unlink(),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_latest_skips_damaged_checkpoints_saying_which(finished, tmp_path, caplog, damage):
    from distill.checkpoint import resolve_resume

    out = _copy(finished, tmp_path)
    DAMAGE[damage](out / "checkpoints" / "step-4")
    with caplog.at_level(logging.WARNING, logger="distill.train"):
        assert resolve_resume("latest", out) == out / "checkpoints" / "step-2"
    assert "skipping step-4" in caplog.text
    with pytest.raises(ValueError, match="step-4"):  # named explicitly, a damaged checkpoint is an error
        resolve_resume(str(out / "checkpoints" / "step-4"), out)


def test_resume_falls_back_past_a_damaged_checkpoint_and_truncates_the_log(setup, finished, tmp_path, caplog):
    out = _copy(finished, tmp_path)
    assert _steps(out) == [1, 2, 3, 4]
    _flip_byte(out / "checkpoints" / "step-4" / "model.safetensors")
    with caplog.at_level(logging.INFO, logger="distill.train"):
        main(_args(setup, out, *RUN, "--resume", "latest"))
    assert "skipping step-4" in caplog.text and "at step 2" in caplog.text
    assert _steps(out) == [1, 2, 3, 4]  # steps 3 and 4 ran again and are logged once


def test_resume_from_an_older_checkpoint_truncates_the_log(setup, finished, tmp_path):
    out = _copy(finished, tmp_path)
    with (out / "train_log.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 1.0')  # a row torn by a kill mid-write
    main(_args(setup, out, *RUN, "--resume", str(out / "checkpoints" / "step-2")))
    assert _steps(out) == [1, 2, 3, 4]


@pytest.mark.parametrize("where", ["checkpoint", "final"])
def test_disk_full_leaves_no_partial_checkpoint_or_final(setup, tmp_path, capsys, monkeypatch, where):
    import errno

    from accelerate import Accelerator

    from distill import final as final_mod

    def full(directory):
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "partial.bin").write_bytes(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "checkpoint":  # the final checkpoint (step 4) hits a full disk
        save_state = Accelerator.save_state
        monkeypatch.setattr(Accelerator, "save_state", lambda self, d, **kw: (
            full(d) if d.endswith("step-4") else save_state(self, d, **kw)))
    else:
        monkeypatch.setattr(final_mod, "save_model", lambda model, d: full(d))
    out = tmp_path / "out"
    assert cli(_args(setup, out, *RUN)) == 1
    assert "No space left on device" in capsys.readouterr().err.splitlines()[-1]
    assert _ckpts(out) == (["step-2"] if where == "checkpoint" else ["step-2", "step-4"])
    assert not (out / "final").exists() and not list(out.rglob(".tmp-*")) and not (out / ".lock").exists()


# -------------------------------------------------------------------------- item 9: CLI errors


@pytest.mark.parametrize("extra, expected", [
    (["optim.lrr=1"], r"unknown config key 'optim.lrr'.*'lr'"),
    (["optim.lr=abc"], r"optim\.lr: expected float, got 'abc'"),
    (["optim.lr"], r"override 'optim.lr' is not of the form key=value"),
    (["optim.lr=-1"], r"optim\.lr=-1.0; expected a finite number > 0"),
    (["keep_checkpoints=0"], r"keep_checkpoints=0; expected an integer >= 1"),
    (["eval_every=-3"], r"eval_every=-3; expected an integer >= 0"),
    (["log_every=0"], r"log_every=0; expected an integer >= 1"),
    (["overwrite=true", "--resume", "latest"], r"overwrite=true deletes the checkpoints"),
])
def test_config_mistakes_are_one_error_line_and_exit_2(setup, tmp_path, capsys, extra, expected):
    import re

    assert cli(_args(setup, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.match(rf"error: .*{expected}", err), err


def test_yaml_list_and_output_dir_file_are_one_error_line(setup, tmp_path, capsys):
    recipe = tmp_path / "list.yaml"
    recipe.write_text("- optim.lr: 1\n")
    assert cli(_args(setup, tmp_path / "out")[2:] + ["--config", str(recipe)]) == 2
    assert capsys.readouterr().err == f"error: {recipe}: expected a mapping of config keys at the top level, got a list\n"
    (tmp_path / "afile").write_text("x")
    assert cli(_args(setup, tmp_path / "afile")) == 2
    assert "output_dir=" in capsys.readouterr().err


def test_failed_gate_exits_1(setup, tmp_path, capsys, monkeypatch):
    from distill import train as train_mod

    def failing(cfg):
        raise train_mod.ParityGateError("an exported variant failed its parity gate")

    monkeypatch.setattr(train_mod, "train", failing)
    assert cli(_args(setup, tmp_path / "out")) == 1
    assert capsys.readouterr().err == "error: an exported variant failed its parity gate\n"


def test_train_script_traceback_only_with_debug(setup, tmp_path):
    cmd = [sys.executable, str(REPO / "distill" / "train.py"), *_args(setup, tmp_path / "out", "optim.lr=-1")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("CLIP_DISTILL_DEBUG", None)
    plain = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 2 and plain.stderr == "error: optim.lr=-1.0; expected a finite number > 0\n"
    debug = subprocess.run(cmd, env=dict(env, CLIP_DISTILL_DEBUG="1"), capture_output=True, text=True, timeout=300)
    assert debug.returncode == 2 and "Traceback" in debug.stderr and debug.stderr.endswith(plain.stderr)


def test_evaluate_cli_errors(tiny_clip_dir, tmp_path, capsys, monkeypatch):
    from distill import evaluate as evaluate_mod

    data = tmp_path / "data"
    data.mkdir()
    write_labelled(data, n=4)
    capsys.readouterr()  # datagen's progress bars
    base = ["--model", str(tiny_clip_dir), "--data", str(data), "--split", "train", "--no-progress"]
    assert evaluate_mod.cli([*base, "--batch-size", "0"]) == 2
    assert capsys.readouterr().err == "error: --batch-size 0: expected an integer >= 1\n"

    def crash(args):
        raise RuntimeError("boom")

    monkeypatch.setattr(evaluate_mod, "evaluate", crash)  # an unexpected error: exit 1, one line, a hint
    assert evaluate_mod.cli(base) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: RuntimeError: boom (rerun with --debug") and "Traceback" not in err
    assert evaluate_mod.cli([*base, "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err
