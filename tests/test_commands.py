"""``clip-distill``: the installed console script lists its commands, hands each one's arguments to
the module's own entry point and returns its exit status (distill/commands.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# each command's help must show flags of its own parser, not a generic one
OWN_FLAGS = {
    "train": ["--config", "--resume", "overrides"],
    "text-student": ["--config", "overrides"],
    "pair": ["--image", "--text", "--out"],
    "soup": ["students", "--out", "--debug"],
    "mean-share": ["--student", "--data", "--limit"],
    "evaluate": ["--model", "--data", "--batch-size", "--classnames"],
    "benchmark": ["--suite", "--reference", "--out"],
    "parity": ["--teacher", "--student", "--variants"],
    "predict": ["--info", "--top-k", "--max-pixels"],
    "precompute": ["--config", "--debug", "overrides"],
    "gpu-check": ["--out", "--quick", "--sections"],
}


def console_script() -> str:
    """The script ``pip install -e .`` puts beside this interpreter (or on PATH)."""
    beside = Path(sys.executable).parent / "clip-distill"
    found = str(beside) if beside.is_file() else shutil.which("clip-distill")
    assert found, "no clip-distill console script: run `pip install -e .` (pyproject.toml [project.scripts])"
    return found


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def clip_distill(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([console_script(), *args], capture_output=True, text=True, env=env(), cwd=REPO,
                          timeout=300)


def test_help_lists_every_command_with_one_line_each():
    from distill.commands import COMMANDS

    done = clip_distill("--help")
    assert done.returncode == 0 and done.stderr == ""
    for name, command in COMMANDS.items():
        assert f"  {name}  " in done.stdout or f"  {name} " in done.stdout
        assert command.summary in done.stdout and command.same_as in done.stdout
    bare = clip_distill()  # no command is a usage mistake: the same list, on stderr, exit 2
    assert bare.returncode == 2 and bare.stdout == "" and all(name in bare.stderr for name in COMMANDS)


def test_unknown_command_is_one_error_line_and_exit_2():
    done = clip_distill("trian", "--help")
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: unknown command 'trian'") and "train" in line and "gpu-check" in line


def test_every_command_help_comes_from_its_own_parser():
    # started together: each process spends its few seconds importing torch and its module
    procs = {name: subprocess.Popen([console_script(), name, "--help"], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env(), cwd=REPO)
             for name in OWN_FLAGS}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"clip-distill {name} --help: exit {proc.returncode}\n{err}"
        for flag in OWN_FLAGS[name]:
            assert flag in out, f"clip-distill {name} --help does not mention {flag}:\n{out}"


def test_bad_input_through_a_command_is_its_exit_2(tmp_path):
    # checked before the model or the data is looked at (neither exists here)
    done = clip_distill("evaluate", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "no-data"),
                        "--batch-size", "0")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "error: --batch-size 0: expected an integer >= 1"


def test_gpu_check_runs_the_script_and_returns_its_status(tmp_path):
    """benchmarks/ is not a package: the command loads the script by path and returns what its main returns."""
    done = clip_distill("gpu-check", "--device", "cpu", "--quick", "--sections", "speed,bogus",
                        "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and "--sections: unknown ['bogus']" in done.stderr
    assert not (tmp_path / "out").exists()  # refused before anything ran


@pytest.mark.parametrize("argv, status", [(["--help"], 0), ([], 2), (["nope"], 2)])
def test_main_in_process(argv, status, capsys):
    from distill.commands import main

    assert main(argv) == status
