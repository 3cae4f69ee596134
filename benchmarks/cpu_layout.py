"""CPU speed of the layout choices in clipcore/towers.py and students/image_only.py.

    python benchmarks/cpu_layout.py

Frozen-tower inference: EfficientNet-Lite2 (reference teacher's image tower, pretrained weights)
at 128 px, images/s by chunk size, in channels_last under no_grad. Student training: forward +
backward (SGD step) of resnet-cifar-m's backbone at batch 128, 32 px, contiguous vs channels_last.
Random inputs; threads as torch sets them (2 on the project's CPU box).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def tower_images_per_s(chunks=(256, 16, 8, 4), size: int = 128, n: int = 256) -> dict[int, float]:
    from clipcore import towers

    model = towers.build_reference_dual_encoder("lite2", head="mlp", image_size=size).eval()
    x = torch.randn(n, 3, size, size)
    out = {}
    for chunk in chunks:
        towers.CPU_INFERENCE_CHUNK = chunk
        with torch.no_grad():
            model.image_tower_features(x[:16])
            start = time.perf_counter()
            model.image_tower_features(x)
        out[chunk] = n / (time.perf_counter() - start)
    return out


def student_images_per_s(channels_last: bool, steps: int = 5) -> float:
    from transformers import ResNetConfig, ResNetModel

    model = ResNetModel(ResNetConfig(embedding_size=48, hidden_sizes=[48, 96, 192, 384], depths=[1, 2, 2, 1],
                                     layer_type="basic"))
    x = torch.randn(128, 3, 32, 32)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        model(x).pooler_output.sum().backward()
        opt.step()
        opt.zero_grad()
    return steps * 128 / (time.perf_counter() - start)


if __name__ == "__main__":
    print(f"threads: {torch.get_num_threads()}")
    for chunk, ips in tower_images_per_s().items():
        print(f"Lite2 128 px, chunk {chunk}: {ips:.0f} images/s")
    for cl in (False, True):
        print(f"resnet-cifar-m train, {'channels_last' if cl else 'contiguous'}: {student_images_per_s(cl):.0f} images/s")
