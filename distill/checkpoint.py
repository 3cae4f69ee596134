"""Training checkpoints: ``accelerator.save_state`` plus the loop position, written atomically and
verified before they are resumed.

Each ``checkpoints/step-N`` holds ``manifest.json``: the size and sha256 of every file beside it, the
id of the run that wrote it and that run's resolved config. A checkpoint is written into a
``.tmp-*`` directory and renamed into place once its manifest is written, so a run killed mid-write
leaves no ``step-N``; a file damaged afterwards (truncated, a flipped byte, a disk that lost the
last writes) no longer matches its checksum, and ``latest`` falls back to an older checkpoint.

``checkpoints/step-*`` holds the checkpoints of one run (the current one, or the one it resumes):
a run first moves those of other runs into ``checkpoints/previous-<run id>/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger("distill.train")
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
PREVIOUS_PREFIX = "previous-"  # checkpoints/previous-<run id>/: earlier runs' checkpoints, set aside


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed: it is damaged, incomplete or was written under another config."""


@dataclass(frozen=True)
class RunInfo:
    """What a checkpoint records about the run that wrote it."""

    run_id: str  # a resumed run keeps the id of the run it continues
    config: dict  # the resolved config, nested as in config.yaml


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _step_of(path: Path) -> int | None:
    prefix, _, num = path.name.partition("-")
    return int(num) if prefix == "step" and num.isdigit() else None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Every ``step-N`` directory, oldest first, verified or not."""
    root = checkpoint_dir(output_dir)
    found = [p for p in root.glob("step-*") if p.is_dir() and _step_of(p) is not None] if root.is_dir() else []
    return sorted(found, key=_step_of)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(directory: Path, run: RunInfo, state: dict) -> None:
    files = {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE}
    manifest = {"format": MANIFEST_FORMAT, "run_id": run.run_id, "step": state["step"], "config": run.config,
                "files": files}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))


def read_manifest(directory: Path) -> dict:
    """The parsed manifest, unverified; CheckpointError when it is missing or not a manifest."""
    path = Path(directory) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no {MANIFEST_FILE} (not a checkpoint, or written by an older version)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from None
    if not (isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT
            and isinstance(manifest.get("files"), dict) and isinstance(manifest.get("config"), dict)):
        raise CheckpointError(f"{path}: not a format-{MANIFEST_FORMAT} checkpoint manifest")
    return manifest


def verify_checkpoint(directory: str | Path) -> dict:
    """Check every file of a checkpoint against its manifest; returns the manifest.

    Raises:
        CheckpointError: naming the first file that is missing, of the wrong size or content.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if STATE_FILE not in manifest["files"]:
        raise CheckpointError(f"{directory}: its manifest lists no {STATE_FILE}")
    for rel, meta in manifest["files"].items():
        path = directory / rel
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        size = path.stat().st_size
        if size != meta.get("size"):
            raise CheckpointError(f"{path}: {size} bytes, its manifest says {meta.get('size')} (truncated?)")
        if _sha256(path) != meta.get("sha256"):
            raise CheckpointError(f"{path}: content does not match its sha256 (damaged)")
    return manifest


def load_state(directory: Path) -> dict:
    """The loop position saved with a (verified) checkpoint."""
    state = json.loads((directory / STATE_FILE).read_text())
    if not all(isinstance(state.get(k), int) for k in ("step", "epoch", "batch")):
        raise CheckpointError(f"{directory / STATE_FILE}: expected integer step, epoch and batch, got {state}")
    return state


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint that verifies; each newer one that does not is named with its reason."""
    for path in reversed(list_checkpoints(output_dir)):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as exc:
            log.warning("resume=latest: skipping %s: %s", path.name, exc)
    return None


def save_checkpoint(accelerator, output_dir: str | Path, state: dict, keep: int, run: RunInfo,
                    extra: Callable[[Path], object] | None = None) -> Path:
    """``accelerator.save_state`` into a temporary directory, renamed into place once its manifest is written.

    Only this run's checkpoints (same ``run.run_id``) count towards ``keep``: those of another
    run in the same directory are never pruned. ``extra(directory)`` (main process) writes state
    that is not in the model's ``state_dict``, e.g. QAT's activation ranges; the manifest covers it.
    """
    root = checkpoint_dir(output_dir)
    final = root / f"step-{state['step']}"
    tmp = root / f".tmp-step-{state['step']}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        # every process writes its own random_states_<rank>.pkl; the manifest's checksums and the
        # rename must wait for the slowest one (seen under load: a checkpoint with one of two)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps(state))
            if extra is not None:
                extra(tmp)
            write_manifest(tmp, run, state)
    except BaseException:
        if accelerator.is_main_process:  # e.g. disk full: leave no partial directory behind
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in [p for p in list_checkpoints(output_dir) if _run_id(p) == run.run_id][:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _run_id(path: Path) -> str | None:
    try:
        return read_manifest(path)["run_id"]
    except CheckpointError:
        return None


def earlier_runs_checkpoints(output_dir: str | Path) -> list[Path]:
    """The checkpoints set aside by :func:`set_aside_other_runs` (``checkpoints/previous-<run id>/step-N``)."""
    root = checkpoint_dir(output_dir)
    found = root.glob(f"{PREVIOUS_PREFIX}*/step-*") if root.is_dir() else []
    return sorted(p for p in found if p.is_dir() and _step_of(p) is not None)


def set_aside_other_runs(output_dir: str | Path, run_id: str) -> list[Path]:
    """Move every ``checkpoints/step-N`` that run ``run_id`` did not write into
    ``checkpoints/previous-<its run id>/step-N`` (``previous-unknown`` without a readable manifest).

    Then ``checkpoints/step-*`` holds this run's checkpoints only: ``--resume latest`` can only
    continue this run, a checkpoint name is never shared by two runs, and pruning never sees another
    run's checkpoint. Called by the main process at the start of a run. Returns the new paths.
    """
    moved = []
    for ckpt in list_checkpoints(output_dir):
        other = _run_id(ckpt)
        if other == run_id:
            continue
        name = other if isinstance(other, str) and re.fullmatch(r"[0-9A-Za-z_-]{1,64}", other) else "unknown"
        dest = checkpoint_dir(output_dir) / f"{PREVIOUS_PREFIX}{name}" / ckpt.name
        dest.parent.mkdir(exist_ok=True)
        shutil.rmtree(dest, ignore_errors=True)  # the same run's same step, written again by its resumption
        os.replace(ckpt, dest)
        moved.append(dest)
    if moved:
        log.info("set aside %d checkpoints of earlier runs: %s", len(moved),
                 ", ".join(str(p.relative_to(checkpoint_dir(output_dir))) for p in moved))
    return moved


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint ``resume`` names (``latest``: the newest one that verifies), verified.

    Raises:
        CheckpointError: an explicitly named checkpoint does not verify.
    """
    if not resume:
        return None
    if resume == "latest":
        found = latest_checkpoint(output_dir)
        if found is None:
            log.warning("resume=latest: no checkpoint that verifies under %s; starting fresh", checkpoint_dir(output_dir))
        return found
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"resume={resume}: not a directory")
    try:
        verify_checkpoint(path)
    except CheckpointError as exc:
        raise CheckpointError(f"resume={resume}: {exc}") from None
    return path
