"""benchmarks/gpu_check.py --device cpu --quick: every code path of the GPU check, on the CPU."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
SPEED_ROWS = {f"{name} 32px {precision} teacher {mode}"
              for name in ("resnet-cifar-m", "vit-tiny-16", "mobilenetv2-1.0")
              for precision in ("bf16", "fp32") for mode in ("cached", "online")}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    # exactly the documented command, from the repo root with PYTHONPATH=. and nothing installed on top
    env = {**os.environ, "PYTHONPATH": "."}
    proc = subprocess.run([sys.executable, str(SCRIPT.relative_to(REPO)), "--device", "cpu", "--quick", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return proc, out, cpu_s


def test_quick_cpu_run_covers_every_check_and_passes(quick_run):
    proc, out, cpu_s = quick_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    rows = {(r["section"], r["name"]): r for r in report["rows"]}
    by_section = {}
    for section, name in rows:
        by_section.setdefault(section, set()).add(name)
    assert {"correctness", "distributed", "speed", "export"} <= set(by_section)
    # every code path ran: on a CPU nothing is skipped but the GPU-only export providers
    skipped = {name for (section, name), r in rows.items() if r["status"] == "skipped"}
    assert skipped == {"ort-cuda-fp32", "ort-trt-fp16", "trt-fp16"}, skipped
    assert all(r["status"] == "ok" for r in report["rows"] if r["name"] not in skipped)
    assert all(rows["export", name]["reason"] for name in skipped)  # each says why
    assert SPEED_ROWS <= by_section["speed"] and "teacher inference bf16, batch 2" in by_section["speed"]
    for precision in ("bf16", "fp16 + GradScaler"):
        m = rows["correctness", f"resnet-cifar-m 32px {precision}"]["metrics"]
        assert m["max_rel_diff_vs_fp32"] <= m["tolerance"] and m["last_loss"] < m["first_loss"]
    dist = rows["distributed", "all-gather CLIP loss parity, 2 processes"]["metrics"]
    assert dist["backend"] == "gloo" and dist["loss_abs_diff"] < 1e-4 and dist["grad_max_abs_diff"] < 1e-4
    assert rows["export", "ort-cpu-fp32"]["metrics"]["max_abs_diff_vs_torch_fp32"] < 1e-4
    assert all(r["metrics"]["images_per_s"] > 0 for r in report["rows"] if r["section"] == "speed")
    # under a minute of CPU (wall time on a shared machine is not the script's to promise)
    assert cpu_s < 60, f"{cpu_s:.0f} s of CPU"


def test_markdown_lists_every_row_with_its_status(quick_run):
    _, out, _ = quick_run
    report = json.loads((out / "gpu_check.json").read_text())
    md = (out / "gpu_check.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| section")]
    assert len(table) == len(report["rows"])
    assert "| export | trt-fp16 | skipped: the tensorrt Python module is not installed" in md
    assert "transformers" in md and "torch" in md  # the environment line


def test_bad_arguments_exit_2_with_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": "."}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--sections", "speed,bogus",
                           "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: --sections")


def test_distributed_check_retries_once_after_a_worker_is_killed_by_a_signal(monkeypatch):
    """A worker killed by a signal (a gloo teardown abort) is retried once and reported; a second is an error."""
    import importlib

    import torch
    import torch.multiprocessing as mp

    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # importable by name in the spawned workers too
    gpu_check = importlib.import_module("gpu_check")
    real_spawn, calls = mp.spawn, []

    def flaky_spawn(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise mp.ProcessExitedException("process 0 terminated with signal SIGABRT", 0, 1, -6, "SIGABRT")
        return real_spawn(*args, **kwargs)

    monkeypatch.setattr(mp, "spawn", flaky_spawn)
    result = gpu_check.distributed_parity(torch.device("cpu"), gpu_check.Settings.quick())
    assert len(calls) == 2 and "SIGABRT" in result["retried_after"]
    assert result["loss_abs_diff"] < 1e-5

    def always_killed(*args, **kwargs):
        raise mp.ProcessExitedException("process 1 terminated with signal SIGKILL", 1, 1, -9, "SIGKILL")

    monkeypatch.setattr(mp, "spawn", always_killed)
    with pytest.raises(mp.ProcessExitedException, match="SIGKILL"):
        gpu_check.distributed_parity(torch.device("cpu"), gpu_check.Settings.quick())


def test_train_loop_precisions_runs_every_precision_of_the_real_loop(tmp_path):
    """benchmarks/train_loop_precisions.py on the CPU: both tasks, three precisions, the real entry point."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import train_loop_precisions
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    rows = train_loop_precisions.run(["--steps", "2", "--cpu", "--out", str(tmp_path / "rows.json")])
    assert [(r["task"], r["precision"]) for r in rows] == [
        (t, p) for t in ("labelled", "captions+clip") for p in ("no", "bf16", "fp16")]
    assert all(r["steps"] == 2 and r["finite"] and r["peak_gpu_mib"] is None for r in rows)
    assert json.loads((tmp_path / "rows.json").read_text()) == rows
