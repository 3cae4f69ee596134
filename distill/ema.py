"""An exponential moving average of the student's weights (``optim.ema_decay``): when it is on, the average is
the model evaluated during training, saved as ``final/`` and exported; the live weights only train.

Why: averaging weights helped the general student where it is short (unseen photos): the average of two
6,000-step runs kept cosine 0.584 to the teacher on scene-photos validation against its parents' 0.577 and 0.579
(docs/benchmarks.md, "Weight averaging"), but two runs cost twice the 60 min budget. An average along one run's
trajectory costs a copy of the image tower. torch's ``AveragedModel`` does the arithmetic (a foreach lerp over
parameters and buffers, so the batch-norm statistics are averaged with the weights they belong to); this module
adds what a training run needs around it: the checkpoint file, in safetensors, so that a resumed run continues
the same average instead of restarting it from the resumed weights.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from distill.config import ConfigError

log = logging.getLogger("distill.ema")
EMA_FILE = "ema_student.safetensors"


class StudentEMA:
    """``decay`` x the average + (1 - decay) x the live weights after every optimizer step; the first update
    copies the live weights (torch's EMA convention), so the average starts where training does."""

    def __init__(self, student: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"optim.ema_decay={decay}; expected a decay in (0, 1), or 0 for no average")
        self.decay = decay
        # the student's deepcopy shares a frozen teacher it holds by reference (students/image_only.py)
        self.averaged = AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.averaged.requires_grad_(False)
        self.averaged.eval()

    @property
    def student(self) -> nn.Module:
        """The averaged student, a module of the live student's class."""
        return self.averaged.module

    @property
    def updates(self) -> int:
        return int(self.averaged.n_averaged)

    @torch.no_grad()
    def update(self, live: nn.Module) -> None:
        self.averaged.update_parameters(live)

    def save(self, directory: Path) -> None:
        """Into a checkpoint directory (its manifest, written after, covers the file)."""
        save_model(self.averaged, str(Path(directory) / EMA_FILE))

    def load(self, checkpoint: Path) -> None:
        """Continue the average a checkpoint saved.

        Raises:
            ConfigError: the checkpoint holds no average (written without ``optim.ema_decay``) or one of another
                model, naming the file.
        """
        path = Path(checkpoint) / EMA_FILE
        if not path.is_file():
            raise ConfigError(f"optim.ema_decay={self.decay}: {checkpoint} holds no {EMA_FILE} (not written by a run "
                              "with a weight average): the average cannot be continued; start the run afresh")
        try:
            load_model(self.averaged, str(path), strict=True)
        except RuntimeError as exc:  # safetensors names missing/unexpected keys and shape mismatches
            raise ConfigError(f"{path}: not an average of this student: {exc}") from exc
        log.info("EMA: average of %d updates restored from %s", self.updates, path)


def attach_ema(decay: float, live: nn.Module) -> StudentEMA | None:
    """The run's weight average, or None when ``optim.ema_decay`` is 0."""
    return StudentEMA(live, decay) if decay > 0 else None


def checkpoint_writers(*writers: Callable[[Path], object] | None) -> Callable[[Path], None] | None:
    """One ``extra`` for :func:`distill.checkpoint.save_checkpoint` that runs every given writer (None: none)."""
    active = [w for w in writers if w is not None]
    if not active:
        return None

    def write(directory: Path) -> None:
        for writer in active:
            writer(directory)

    return write
