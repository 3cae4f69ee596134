"""Model size and cost: parameter counts and GFLOPs per image, measured with torch's FLOP counter."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from clipcore.dual_encoder import DualEncoder


@torch.no_grad()
def image_gflops(model: DualEncoder) -> float:
    """Forward GFLOPs of ``encode_image`` for one image at the model's input size.

    Counts multiply-adds as 2 FLOPs (matmuls and convolutions, as torch's counter does);
    element-wise ops are not counted, so this is the usual "FLOPs" of model cards.
    """
    h, w = model.image_transform.output_size
    pixels = torch.zeros(1, 3, h, w, device=model.device)
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model.encode_image(pixels)
    model.train(was_training)
    return counter.get_total_flops() / 1e9


def image_parameter_tensors(model: DualEncoder) -> list[torch.nn.Parameter]:
    """The parameters ``encode_image`` uses: those of every module that runs in it.

    Found with forward hooks, so it works for any dual encoder (a CLIP vision tower plus its
    projection, a CNN plus its head) without knowing its attribute names.
    """
    h, w = model.image_transform.output_size
    ran: list[torch.nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, *_: ran.append(mod)) for m in model.modules()]
    was_training = model.training
    model.eval()  # batch 1 through BatchNorm in training mode would fail on 1x1 maps
    try:
        with torch.no_grad():
            model.encode_image(torch.zeros(1, 3, h, w, device=model.device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return list({id(p): p for m in ran for p in m.parameters(recurse=False)}.values())


def image_parameters(model: DualEncoder) -> int:
    """Parameters used by ``encode_image`` (the image tower and its projection)."""
    return sum(p.numel() for p in image_parameter_tensors(model))
