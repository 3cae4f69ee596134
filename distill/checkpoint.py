"""Atomic training checkpoints: ``accelerator.save_state`` plus the loop position."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger("distill.train")
STATE_FILE = "trainer_state.json"


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    done = [p for p in checkpoint_dir(output_dir).glob("step-*") if (p / STATE_FILE).is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


def save_checkpoint(accelerator, output_dir: str | Path, state: dict, keep: int) -> Path:
    """``accelerator.save_state`` into a temporary directory, renamed into place when complete.

    A run killed mid-write leaves only a ``.tmp-*`` directory, which ``latest`` ignores.
    """
    root = checkpoint_dir(output_dir)
    final = root / f"step-{state['step']}"
    tmp = root / f".tmp-step-{state['step']}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        old = sorted((p for p in root.glob("step-*")), key=lambda p: int(p.name.split("-")[1]))[:-keep]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(resume: str | None, output_dir: str) -> Path | None:
    if not resume:
        return None
    if resume == "latest":
        found = latest_checkpoint(output_dir)
        if found is None:
            log.warning("resume=latest: no checkpoint under %s; starting fresh", checkpoint_dir(output_dir))
        return found
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"resume={resume}: not a complete checkpoint (no {STATE_FILE})")
    return path
