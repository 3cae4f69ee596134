"""Stopping a run that diverged: a NaN/inf loss before the update, NaN/inf weights or student outputs
before anything is saved from them. Each error names the step and the last good checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from clipcore.dual_encoder import DualEncoder


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or inf; the message names the step, the term and the last checkpoint."""


class NonFiniteWeightsError(RuntimeError):
    """The weights (or the student's outputs) are NaN or inf after an update; nothing is saved from them."""


def check_finite(losses: dict, step: int, accelerator, last_checkpoint: Path | None) -> None:
    """Stop on NaN/inf in any loss term; all processes agree so none hangs in a collective."""
    bad = [k for k, v in losses.items() if torch.is_tensor(v) and v.dim() == 0 and not torch.isfinite(v)]
    flag = torch.tensor([1.0 if bad else 0.0], device=accelerator.device)
    if accelerator.reduce(flag, reduction="sum").item() > 0:
        terms = ", ".join(f"{k}={losses[k].item()}" for k in bad) or "on another process"
        raise NonFiniteLossError(
            f"step {step}: non-finite loss ({terms}); stopping without updating the weights. "
            f"Last good checkpoint: {last_checkpoint or 'none yet'}"
        )


def check_weights_finite(task: torch.nn.Module, step: int, last_checkpoint: Path | None) -> None:
    """Refuse to save a checkpoint or student from weights an update turned NaN/inf (the loss of that
    update was finite, so :func:`check_finite` has not seen it). Every process holds the same weights
    and so raises together."""
    bad = [name for name, t in task.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteWeightsError(
            f"step {step}: training diverged: {len(bad)} weight tensors hold NaN or inf (first: {bad[0]}); nothing "
            f"is saved from them. Last good checkpoint: {last_checkpoint or 'none yet'} (a lower optim.lr may help)")


@torch.no_grad()
def check_student_finite(student: DualEncoder, step: int, last_checkpoint: Path | None) -> None:
    """One image and one text forward pass of the student to be saved, on a fixed probe input, must
    give finite embeddings: finite weights can still give NaN outputs (an overflow, BatchNorm
    statistics), and a checkpoint is only ever called good once its outputs were checked."""
    height, width = student.image_transform.output_size
    pixels = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0)).to(student.device)
    was_training = student.training
    student.eval()
    try:
        outputs = {"image": student.encode_image(pixels), "text": student.encode_text(["a photo of a thing."])}
    finally:
        student.train(was_training)
    bad = [name for name, emb in outputs.items() if not torch.isfinite(emb).all()]
    if bad:
        raise NonFiniteWeightsError(
            f"step {step}: training diverged: the student's {' and '.join(bad)} embeddings are NaN or inf (its "
            f"weights are finite); nothing is saved from it. Last good checkpoint: {last_checkpoint or 'none yet'}")
