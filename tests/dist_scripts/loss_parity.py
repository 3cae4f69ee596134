"""Cross-process loss parity, run as ``torchrun --nproc_per_node 2 loss_parity.py OUTDIR``.

Each rank takes its slice of one seeded global batch, computes every cross-process loss through a
DDP-wrapped (``accelerator.prepare``) toy student, backpropagates and writes
``OUTDIR/rank{r}.safetensors`` (loss values, DDP-averaged gradients, and the raw per-rank gradients of
an unwrapped copy) plus ``OUTDIR/rank{r}.json``. ``tests/test_dist.py`` compares them with
:func:`reference` on the concatenated batch in one process.

Gradient bookkeeping: rank r's loss is the mean over its own rows; gather_with_grad's backward sums the
gradient from every rank, so the *sum* over ranks of the raw gradients is world_size x the gradient of
the global loss, and DDP's *average* equals the gradient of the global loss.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn

from clipcore.distill_loss import DistillLoss, LossConfig
from clipcore.losses import ClipLoss, InteractiveContrastiveLoss, KLDistillLoss, make_feature_projection, total_loss

WORLD = 2
LOCAL_B = 3
IN, DS, DT, CLASSES = 5, 6, 8, 4
TEACHER_SCALE = 50.0


class ToyTask(nn.Module):
    """Owns everything trainable (both towers, the projection into the teacher space, the logit scale)
    and computes the loss inside ``forward``, like the task module of STYLE.md.

    Computing the loss inside forward matters under DDP with ``find_unused_parameters=True``: returning
    the bare ``log_scale`` parameter from a DDP forward makes DDP mark it ready twice and fail.
    """

    def __init__(self):
        super().__init__()
        self.image = nn.Linear(IN, DS)
        self.text = nn.Linear(IN, DS)
        self.proj = make_feature_projection(DS, DT)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, loss_fn, x_image, x_text, x_class, teacher):
        image, text = self.image(x_image), self.text(x_text)
        student = {
            "student_image": image,
            "student_text": text,
            "student_image_proj": self.proj(image),
            "student_text_proj": self.proj(text),
            "student_class": self.text(x_class),
            "student_log_scale": self.log_scale,
        }
        return loss_fn(student, teacher)


def make_problem():
    """The global batch (WORLD * LOCAL_B rows), fixed teacher embeddings and a seeded student."""
    g = torch.Generator().manual_seed(0)
    n = WORLD * LOCAL_B
    data = {
        "x_image": torch.randn(n, IN, generator=g),
        "x_text": torch.randn(n, IN, generator=g),
        "x_class": torch.randn(CLASSES, IN, generator=g),
        "teacher_image": torch.randn(n, DT, generator=g),
        "teacher_text": torch.randn(n, DT, generator=g),
        "teacher_class": torch.randn(CLASSES, DT, generator=g),
    }
    torch.manual_seed(1)
    return data, ToyTask()


def losses():
    """name -> fn(student_outputs, teacher dict) -> loss dict; each is one backward in the test."""
    clip, kl = ClipLoss(1.0), KLDistillLoss(1.0, temperature=2.0, on_classes=False)
    icl = InteractiveContrastiveLoss(1.0)
    full = DistillLoss(
        LossConfig(kl_weight=0.5, kl_temperature=2.0, clip_weight=1.0, feature_weight=0.3, interactive_weight=0.7)
    )

    def lit(s, t):  # a student using the teacher's frozen text tower: teacher_text is its text side
        s = {k: v for k, v in s.items() if k not in ("student_text", "student_text_proj", "student_class")}
        return clip(**s, **t)

    return {
        "clip": lambda s, t: clip(**s, **t),
        "kl_affinity": lambda s, t: kl(**s, **t),
        "interactive": lambda s, t: icl(**s, **t),
        "lit_clip": lit,
        "total": lambda s, t: full(**s, **t),
    }


def teacher_inputs(data, rows):
    return {
        "teacher_image": data["teacher_image"][rows],
        "teacher_text": data["teacher_text"][rows],
        "teacher_class": data["teacher_class"],
        "teacher_scale": TEACHER_SCALE,
    }


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def reference() -> dict[str, dict]:
    """One process, whole batch: {name: {"loss": float tensor, "grads": {param: grad}}}."""
    data, model = make_problem()
    rows = slice(None)
    out = {}
    for name, fn in losses().items():
        model.zero_grad(set_to_none=True)
        loss = total_loss(model(fn, data["x_image"], data["x_text"], data["x_class"], teacher_inputs(data, rows)))
        loss.backward()
        out[name] = {"loss": loss.detach(), "grads": grads(model)}
    return out


def main(outdir: str) -> None:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs
    from safetensors.torch import save_file

    from clipcore.dist import check_equal_batch, gather_with_grad, rank, world_size

    # Not every loss uses every parameter (lit_clip leaves the text tower out).
    accelerator = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    r, w = rank(), world_size()
    assert (r, w) == (accelerator.process_index, accelerator.num_processes) and w == WORLD, (r, w)

    data, model = make_problem()
    raw = ToyTask()
    raw.load_state_dict(model.state_dict())
    ddp = accelerator.prepare(model)
    rows = slice(r * LOCAL_B, (r + 1) * LOCAL_B)
    inputs = (data["x_image"][rows], data["x_text"][rows], data["x_class"])
    tensors, info = {}, {"rank": r, "world_size": w, "ddp": type(ddp).__name__}

    for name, fn in losses().items():
        model.zero_grad(set_to_none=True)
        loss = total_loss(ddp(fn, *inputs, teacher_inputs(data, rows)))
        accelerator.backward(loss)
        tensors[f"{name}/loss"] = loss.detach().reshape(1)
        for pname, g in grads(model).items():
            tensors[f"{name}/grad/{pname}"] = g

    # The same "total" loss through a copy that DDP does not touch: raw per-rank gradients.
    total_loss(raw(losses()["total"], *inputs, teacher_inputs(data, rows))).backward()
    for pname, g in grads(raw).items():
        tensors[f"raw_total/grad/{pname}"] = g

    # Unequal local batches must fail loudly on every rank (not hang, not mis-label).
    errors = []
    for check in (lambda: check_equal_batch(2 + r), lambda: gather_with_grad(torch.zeros(2 + r, 3))):
        try:
            check()
            errors.append(None)
        except ValueError as exc:
            errors.append(str(exc))
    info["unequal_batch_errors"] = errors

    out = Path(outdir)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"rank{r}.safetensors"))
    (out / f"rank{r}.json").write_text(json.dumps(info))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
