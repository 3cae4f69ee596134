"""distill.checkpoint on plain files: every way a checkpoint can fail to verify is named, none is resumed."""

from __future__ import annotations

import json
import logging

import pytest

from distill.checkpoint import (MANIFEST_FILE, STATE_FILE, CheckpointError, RunInfo, latest_checkpoint, load_state,
                                resolve_resume, write_manifest)


def _checkpoint(output_dir, step, state=None):
    path = output_dir / "checkpoints" / f"step-{step}"
    path.mkdir(parents=True)
    (path / STATE_FILE).write_text(json.dumps(state or {"step": step, "epoch": 0, "batch": step}))
    (path / "model.safetensors").write_bytes(b"weights" * step)
    write_manifest(path, RunInfo("run-1", {"seed": 0}), {"step": step})
    return path


def _rewrite_manifest(path, change):
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    change(manifest)
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / MANIFEST_FILE).write_text("{not json"), r"manifest.json: unreadable"),
    (lambda p: _rewrite_manifest(p, lambda m: m.update(format=99)), r"manifest.json: not a format-1 checkpoint manifest"),
    (lambda p: _rewrite_manifest(p, lambda m: m["files"].pop(STATE_FILE)), r"its manifest lists no trainer_state.json"),
    (lambda p: (p / "model.safetensors").unlink(), r"model.safetensors: missing"),
    (lambda p: (p / MANIFEST_FILE).unlink(), r"no manifest.json \(not a checkpoint"),
])
def test_a_checkpoint_that_does_not_verify_is_named_and_skipped(tmp_path, caplog, damage, message):
    older, newer = _checkpoint(tmp_path, 1), _checkpoint(tmp_path, 2)
    assert latest_checkpoint(tmp_path) == newer
    damage(newer)
    with pytest.raises(CheckpointError, match=rf"resume={newer}: .*{message}"):
        resolve_resume(str(newer), tmp_path)
    with caplog.at_level(logging.WARNING, logger="distill.train"):
        assert resolve_resume("latest", tmp_path) == older  # the damaged newer one is passed over, with its reason
    assert "skipping step-2" in caplog.text
    damage(older)
    with caplog.at_level(logging.WARNING, logger="distill.train"):
        assert resolve_resume("latest", tmp_path) is None
    assert "no checkpoint that verifies" in caplog.text


def test_resume_names_a_directory_and_the_state_holds_integers(tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(CheckpointError, match=rf"resume={a_file}: not a directory"):
        resolve_resume(str(a_file), tmp_path)
    assert resolve_resume("", tmp_path) is None and resolve_resume("latest", tmp_path / "empty") is None
    good = _checkpoint(tmp_path, 1)
    assert load_state(good) == {"step": 1, "epoch": 0, "batch": 1}
    bad = _checkpoint(tmp_path, 2, state={"step": "2", "epoch": 0, "batch": 1})
    with pytest.raises(CheckpointError, match=r"trainer_state.json: expected integer step, epoch and batch"):
        load_state(bad)
