"""A training run owns its ``output_dir``: one live run per directory, and no run that silently
continues, prunes or overwrites the checkpoints of a run with another config.

The lock is ``output_dir/.lock``, holding the owner's pid, host and start time, under an exclusive
``flock``: the kernel drops the flock when its process dies (even by SIGKILL), so a lock file left
by a dead run is taken over while one held by a live run is refused.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

from clipcore.cache import atomic_write_text
from distill.checkpoint import CheckpointError, checkpoint_dir, earlier_runs_checkpoints, list_checkpoints, read_manifest

log = logging.getLogger("distill.train")
LOCK_FILE = ".lock"
LOG_FILE = "train_log.jsonl"
# Keys that may differ between a checkpoint and the run resuming it: how long the run is, what it
# logs and evaluates, where it writes, and speed-only settings. Everything else shapes the weights.
RESUMABLE_KEYS = ("optim.max_steps", "log_every", "eval_every", "save_every", "keep_checkpoints", "progress",
                  "resume", "overwrite", "output_dir", "cpu", "cpu_threads", "data.num_workers", "cache.dir",
                  "data.eval", "data.eval_split", "data.eval_limit", "data.eval_classnames", "data.eval_templates",
                  "teacher.build_recipe", "contrastive.build_recipe")
RESUMABLE_SECTIONS = ("export.",)
# What a run writes into output_dir besides config.yaml; overwrite=true deletes these first.
RUN_OUTPUTS = ("checkpoints", "final", "export", "tb", LOG_FILE, "metrics.json")
FINAL_CONFIG = "training_config.yaml"  # the resolved config saved inside final/


class RunDirError(ValueError):
    """``output_dir`` is in use by a live run, or holds checkpoints this run must not touch."""


class RunLock:
    """Exclusive ownership of a directory for the lifetime of one run (see the module docstring)."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise RunDirError(
                    f"output_dir {self.path.parent} is in use by another run (pid {holder.get('pid', '?')} on "
                    f"{holder.get('host', '?')}, started {holder.get('started', '?')}); wait for it to finish "
                    "or choose another output_dir") from None
            if self._still_linked(fd):
                break
            os.close(fd)  # the previous owner removed the file between our open and flock: retry
        previous = _holder(fd)
        if previous.get("pid"):
            log.warning("output_dir %s: taking over the stale lock of pid %s on %s (that run is no longer running)",
                        self.path.parent, previous["pid"], previous.get("host", "?"))
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd
        return self

    def _still_linked(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # unlinked before unlocking, so no later run finds a file we hold
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def config_differences(recorded: dict, current: dict, what: str = "checkpoint") -> list[str]:
    """``key (checkpoint X, this run Y)`` for every key that shapes training and differs.

    A key the recorded config lacks is no difference while this run keeps its default: it was added to the
    project after that checkpoint was written, and its default is what the checkpoint's code did.
    """
    from distill.config import TrainConfig, to_dict  # here: distill.config is heavier than this module

    old, new, defaults = flatten(recorded), flatten(current), flatten(to_dict(TrainConfig()))
    keys = sorted(k for k in old.keys() | new.keys()
                  if k not in RESUMABLE_KEYS and not k.startswith(RESUMABLE_SECTIONS) and old.get(k) != new.get(k)
                  and not (k not in old and k in defaults and new.get(k) == defaults[k]))
    return [f"{k} ({what} {old.get(k, '<absent>')!r}, this run {new.get(k, '<absent>')!r})" for k in keys]


def check_resumable(checkpoint: Path, manifest: dict, current: dict) -> None:
    """Refuse to resume a checkpoint written under another config, naming the keys that differ."""
    diff = config_differences(manifest["config"], current)
    if diff:
        raise RunDirError(
            f"cannot resume {checkpoint}: it was written under another config; differing keys: {'; '.join(diff)}. "
            f"Only {', '.join(RESUMABLE_KEYS[:5])}, ... and export.* may change on resume (docs/reliability.md)")


def check_fresh_start(output_dir: Path, current: dict, overwrite: bool) -> None:
    """A fresh run (no resume) refuses a directory holding checkpoints or a ``final/`` of another
    config (or of an unknown one), unless ``overwrite`` is set (then :func:`clear_outputs` deletes
    the earlier run's outputs)."""
    if overwrite:
        return
    foreign = []
    root = checkpoint_dir(output_dir)
    for ckpt in list_checkpoints(output_dir) + earlier_runs_checkpoints(output_dir):
        try:
            diff = config_differences(read_manifest(ckpt)["config"], current)
        except CheckpointError as exc:
            diff = [f"unknown config: {exc}"]
        if diff:
            foreign.append(f"{ckpt.relative_to(root)}: {'; '.join(diff)}")
    final = Path(output_dir) / "final"
    if final.exists():  # the finished model of an earlier run: replacing it is as final as pruning a checkpoint
        try:
            diff = config_differences(_final_config(final), current, "final")
        except RunDirError as exc:
            diff = [f"unknown config: {exc}"]
        if diff:
            foreign.append(f"final/: {'; '.join(diff)}")
    if foreign:
        raise RunDirError(
            f"output_dir {output_dir} holds checkpoints or a final/ model of a run with another config "
            f"({' | '.join(foreign)}); "
            "choose another output_dir, resume that run with its own config (--resume latest), or pass "
            f"overwrite=true to delete its {', '.join(RUN_OUTPUTS)}")


def _final_config(final: Path) -> dict:
    """The config recorded in ``final/training_config.yaml`` (written by distill.final.save_final)."""
    import yaml

    path = final / FINAL_CONFIG
    try:
        config = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RunDirError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise RunDirError(f"{path}: unreadable ({type(exc).__name__})") from None
    if not isinstance(config, dict):
        raise RunDirError(f"{path}: not a mapping of config keys")
    return config


def clear_outputs(output_dir: Path) -> None:
    """``overwrite=true``: delete what earlier runs wrote into ``output_dir``."""
    existing = [name for name in RUN_OUTPUTS if (output_dir / name).exists()]
    if existing:
        log.warning("overwrite=true: deleting %s in %s", ", ".join(existing), output_dir)
    for name in existing:
        path = output_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def truncate_log(path: Path, step: int) -> None:
    """Keep the rows of ``train_log.jsonl`` up to ``step`` (the position a run starts from), so a
    resumed run does not repeat the steps logged after its checkpoint; a torn last line goes too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))
