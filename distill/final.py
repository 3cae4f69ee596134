"""The run's final student: written atomically, with its resolved config and a model card."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from clipcore.distill_loss import LossConfig
from clipcore.dual_encoder import DualEncoder
from clipcore.towers import TowerDualEncoder
from distill.config import TrainConfig, dump_config
from students import save_student


def save_model(model: DualEncoder, directory: Path) -> None:
    """Save a trained student or fine-tuned dual encoder in the format its loader reads."""
    if isinstance(model, TowerDualEncoder):
        model.save_directory(directory)
    else:
        save_student(model, directory)


def save_final(cfg: TrainConfig, student: DualEncoder, out: Path, metrics: dict, steps: int) -> Path:
    """Write ``final/`` into a temporary directory and rename it into place: a kill or a full disk
    leaves the previous ``final/`` (or none), never a partial one."""
    final, tmp = out / "final", out / ".tmp-final"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_model(student, tmp)
        dump_config(cfg, tmp / "training_config.yaml")
        write_model_card(tmp, cfg, metrics, steps)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out / ".old-final"  # the previous final/ is moved aside, not deleted, until the new one is in place
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _training_data(cfg: TrainConfig) -> str:
    if isinstance(cfg.data.train, str):
        limit = f" (first {cfg.data.train_limit} rows, seeded)" if cfg.data.train_limit else ""
        return f"`{cfg.data.train}` split `{cfg.data.train_split}`{limit}"
    # a mixture of sources (images only, labels unused)
    return ", ".join(f"`{s.path}` split `{s.split}`" + (f" ({s.limit} seeded rows)" if s.limit else "")
                     for s in cfg.data.train) + " (images only)"


def _head_note(cfg: TrainConfig) -> str:
    notes = {"mlp": "; MLP projection head", "teacher": "; MLP projection head copied from the teacher's image head"}
    return notes.get(cfg.student.head, "")


def _loss_note(loss: LossConfig) -> str:
    """Every term the run trained with (weight > 0), with its weight: what the card's reader needs to rerun it."""
    kl_on = [name for name, on in (("classes", loss.kl_on_classes), ("affinities", loss.kl_on_affinity)) if on]
    terms = [
        (loss.kl_weight, f"KL {loss.kl_weight} (T={loss.kl_temperature}; {', '.join(kl_on)})"),
        (loss.clip_weight, f"CLIP {loss.clip_weight}"),
        (loss.feature_weight, f"feature {loss.feature_weight} ({loss.feature_kind})"),
        (loss.interactive_weight, f"interactive {loss.interactive_weight}"),
        (loss.tower_weight, f"tower hint {loss.tower_weight}"),
        (loss.caption_weight, f"caption bank {loss.caption_weight} ({loss.caption_bank_size} captions a step)"),
        (loss.image_affinity_weight, f"image affinities {loss.image_affinity_weight}"),
        (loss.caption_contrastive_weight, f"caption contrastive {loss.caption_contrastive_weight} "
                                          f"({loss.caption_bank_size} captions a step)"),
    ]
    return ", ".join(text for weight, text in terms if weight > 0)


def write_model_card(directory: Path, cfg: TrainConfig, metrics: dict, steps: int) -> None:
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items()) or "| (no evaluation) | |"
    directory.joinpath("README.md").write_text(
        f"""---
library_name: transformers
tags: [clip, knowledge-distillation, zero-shot-image-classification]
---
# Distilled CLIP student `{cfg.student.arch}`

- **Student:** `{cfg.student.arch}`, {f"initialised from `{cfg.student.init}`" if cfg.student.init else "random initialisation"}{_head_note(cfg)}
- **Teacher:** `{cfg.teacher.name_or_path}`{" (random weights: a pipeline check, not a useful model)" if cfg.teacher.random_init else ""}
- **Training data:** {_training_data(cfg)}
- **Recipe:** {steps} steps, batch {cfg.optim.batch_size} x {cfg.optim.grad_accum} accumulation, lr {cfg.optim.lr},
  losses: {_loss_note(cfg.loss)};
  precision `{cfg.mixed_precision}`. The full resolved config is `training_config.yaml`.

## Zero-shot evaluation (`{cfg.data.eval or cfg.data.train}` split `{cfg.data.eval_split}`, templates `{cfg.data.templates}`)

| metric | value |
|---|---|
{rows}
"""
    )
