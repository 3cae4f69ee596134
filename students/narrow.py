"""Channel inheritance: a narrower EfficientNet-Lite cut from a pretrained one (``hidden_keep``).

An MBConv block expands its input sixfold (1x1 conv), filters each expanded channel on its own
(depthwise 3x3) and projects back (1x1 conv). Those expanded channels hold most of a block's cost
and none of the residual stream, so a block keeps working with fewer of them: the kept channels'
expand filters, depthwise filters, batch norms and project columns are copied, the rest dropped,
and the residual stream, the stem and the head stay as pretrained. This is TinyCLIP's weight
inheritance applied to width (issue 26: a student at 96 px within 1/8 of the teacher's image FLOPs
needs about 45 % of Lite0's expanded channels).

Which channels to keep is decided without data, from what the pretrained weights say about each
channel's contribution to the block's output: the expected size of its activation (the depthwise
batch norm's shift and scale give a Gaussian before ReLU6, whose clipped mean is computed) times
the size of its project column. A random-weight network (building the architecture to load a
checkpoint into) keeps the first channels: only the shapes matter there.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_SAMPLES = torch.linspace(-4.0, 4.0, 161)  # standard-normal grid for the clipped mean (error < 1e-3)


def check_keep(keep: float) -> None:
    """Raise naming the value unless ``keep`` is a share in (0, 1]."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"efficientnet_lite hidden_keep={keep}; expected a share in (0, 1]")


def kept_width(expanded: int, keep: float) -> int:
    """Expanded channels a block keeps: ``keep`` of them, a multiple of 8 (at least 8, at most all)."""
    check_keep(keep)
    return min(expanded, max(8, 8 * round(expanded * keep / 8)))


def channel_importance(block: nn.Module) -> torch.Tensor:
    """Per expanded channel: expected ReLU6 activation (from the depthwise batch norm) x project column L2 norm."""
    bn = block._bn1
    # the running statistics normalise the depthwise output to ~N(0, 1), so after the batch norm
    # channel c is ~N(bias_c, weight_c^2) before ReLU6
    mean, std = bn.bias.detach(), bn.weight.detach().abs()
    z = mean[:, None] + std[:, None] * _SAMPLES[None, :]
    density = torch.exp(-0.5 * _SAMPLES**2) / math.sqrt(2 * math.pi)
    expected = (z.clamp(0.0, 6.0) * density).sum(dim=1) * float(_SAMPLES[1] - _SAMPLES[0])
    column = block._project_conv.weight.detach().flatten(1).norm(dim=0)  # (out, hidden, 1, 1) -> hidden
    return expected * column


def narrow_block(block: nn.Module, keep_idx: torch.Tensor) -> None:
    """Keep only the expanded channels ``keep_idx`` of one MBConv block, in place."""
    idx = keep_idx.sort().values
    width = int(idx.numel())
    _slice_conv(block._expand_conv, out_idx=idx)
    _slice_conv(block._depthwise_conv, out_idx=idx, groups=width)
    _slice_conv(block._project_conv, in_idx=idx)
    for bn in (block._bn0, block._bn1):
        _slice_bn(bn, idx)


def narrow_network(net: nn.Module, keep: float, *, by_importance: bool) -> list[int]:
    """Cut every expanding block of ``net`` to ``keep`` of its expanded channels; the widths kept per block.

    Blocks without expansion (Lite0's first) keep all channels: theirs is the residual stream.
    """
    widths = []
    for block in net._blocks:
        if block._block_args.expand_ratio == 1:
            widths.append(block._bn1.num_features)
            continue
        full = block._bn1.num_features
        width = kept_width(full, keep)
        if width < full:
            if by_importance:
                idx = channel_importance(block).topk(width).indices
            else:
                idx = torch.arange(width)
            narrow_block(block, idx)
        widths.append(width)
    return widths


def _slice_conv(conv: nn.Conv2d, *, out_idx: torch.Tensor | None = None, in_idx: torch.Tensor | None = None,
                groups: int | None = None) -> None:
    weight = conv.weight.detach()
    if out_idx is not None:
        weight = weight[out_idx]
        conv.out_channels = int(out_idx.numel())
        if conv.bias is not None:
            conv.bias = nn.Parameter(conv.bias.detach()[out_idx].clone())
    if in_idx is not None:
        weight = weight[:, in_idx]
        conv.in_channels = int(in_idx.numel())
    if groups is not None:  # depthwise: one group per channel
        conv.groups = groups
        conv.in_channels = groups
    conv.weight = nn.Parameter(weight.clone())


def _slice_bn(bn: nn.BatchNorm2d, idx: torch.Tensor) -> None:
    bn.num_features = int(idx.numel())
    bn.weight = nn.Parameter(bn.weight.detach()[idx].clone())
    bn.bias = nn.Parameter(bn.bias.detach()[idx].clone())
    bn.running_mean = bn.running_mean[idx].clone()
    bn.running_var = bn.running_var[idx].clone()
