"""Process-group helpers for contrastive losses: rank, world size and a differentiable all-gather.

Why not ``accelerator.gather``: it is built on ``all_gather_into_tensor`` (``all_gather`` on gloo),
which autograd does not see, so the gathered batch carries no gradient at all, not even for this
process's own rows. A contrastive loss computed against it trains only through the local term and
drops every gradient in which this rank's embeddings act as negatives for another rank's rows. open_clip's fix (put the
local tensor back into its slot, ``gathered[rank] = x``) restores the local gradient but still misses
the cross-rank part unless every rank computes the *whole* global loss (O(global_batch^2) each).

:func:`gather_with_grad` uses ``torch.distributed.nn.functional.all_gather`` instead: its backward
sends every rank's gradient for slice ``r`` back to rank ``r`` and sums it (a reduce-scatter). With
each rank computing the loss of its *local rows* only (mean over them), the gradient that reaches
rank ``r``'s parameters is ``d(sum_r' L_r') / d theta`` through rank ``r``'s inputs; DDP then
averages over ranks, giving ``d(mean_r L_r) / d theta``, which for equal local batches is exactly the
gradient of the loss on the concatenated global batch. So: no extra loss scaling when the model is
wrapped in DDP (``accelerator.prepare``); if you all-reduce gradients by hand with SUM instead, you get
``world_size`` times the global gradient.

Requirements:
  * every process must have the same local batch size (use ``drop_last=True`` in the data loader):
    ``all_gather`` assumes equal shapes; :func:`gather_with_grad` checks this by default;
  * every process must call the gathers (and their backward) in the same order, so all ranks must run
    the same loss configuration on every step;
  * compute the losses inside the DDP-wrapped module's ``forward`` (or at least do not return a bare
    ``nn.Parameter`` such as the logit scale from it): with ``find_unused_parameters=True`` DDP marks a
    parameter returned as a forward output ready twice and raises.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the default group; 1 when not distributed."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank in the default group; 0 when not distributed."""
    return dist.get_rank() if is_distributed() else 0


def check_equal_batch(local_size: int, device: torch.device | str = "cpu") -> None:
    """Raise ``ValueError`` on every rank when the local batch sizes differ across processes.

    One tiny all-gather of sizes (use the tensors' device: NCCL needs a CUDA tensor).
    """
    if world_size() == 1:
        return
    size = torch.tensor([int(local_size)], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    values = [int(s.item()) for s in sizes]
    if len(set(values)) != 1:
        raise ValueError(
            f"local batch sizes differ across processes {values}: cross-process contrastive losses need "
            "equal per-process batches (use drop_last=True in the training data loader)"
        )


def gather_with_grad(x: torch.Tensor, check_sizes: bool = True) -> torch.Tensor:
    """Concatenate ``x`` from all processes along dim 0, keeping autograd across processes.

    Args:
        x: local tensor of shape (B, ...); B must be the same on every rank.
        check_sizes: first all-gather the batch sizes and raise a clear ``ValueError`` if they differ
            (one extra tiny collective; pass False once the caller has checked).

    Returns:
        (world_size * B, ...) tensor ordered by rank; rows ``rank*B:(rank+1)*B`` are this rank's.
        With world size 1, ``x`` itself. When ``x`` needs no gradient (teacher embeddings, or under
        ``no_grad``) a plain all-gather is used and the result carries no graph.
    """
    if world_size() == 1:
        return x
    if check_sizes:
        check_equal_batch(x.shape[0], x.device)
    if x.requires_grad and torch.is_grad_enabled():
        # Public autograd-aware gather. Recent torch marks it deprecated (FutureWarning, once) in favour of
        # the private ``_functional_collectives``; tests/test_dist.py pins its gradient semantics.
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(x), dim=0)
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)
