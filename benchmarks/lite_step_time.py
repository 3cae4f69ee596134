"""Train-step time of an EfficientNet-Lite student (batch 128, AdamW) with the stem and first N blocks frozen.

    python benchmarks/lite_step_time.py 0 0b 3 5     # N=0: nothing frozen; a trailing b: bf16 autocast
    STUDENT=efficientnet-lite0-96-h45 python benchmarks/lite_step_time.py 0 3 5   # another registered student
    DEVICE=cuda STEPS=20 python benchmarks/lite_step_time.py 5 5b     # on a GPU (synchronised timings)

Median of the timed steps (STEPS, default 6, less 2 warm-up steps), on random pixels (a step's cost does
not depend on them).
"""

from __future__ import annotations

import os
import sys
import time

import torch

from students import build_student, freeze_early_blocks


def step_seconds(frozen: int, bf16: bool = False, steps: int = 6, name: str = "efficientnet-lite0-64",
                 device: str = "cpu") -> float:
    student = build_student(name, embed_dim=512, init="imagenet").train().to(device)
    freeze_early_blocks(student, frozen)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], 1e-3)
    pixels = torch.randn(128, 3, *student.image_transform.output_size, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)  # GPU kernels run async
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            loss = student.image_tower(pixels).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times[2:])[len(times[2:]) // 2]


if __name__ == "__main__":
    torch.manual_seed(0)
    name = os.environ.get("STUDENT", "efficientnet-lite0-64")
    device, steps = os.environ.get("DEVICE", "cpu"), int(os.environ.get("STEPS", "6"))
    for arg in sys.argv[1:] or ["0", "3", "5"]:
        n, bf16 = int(arg.rstrip("b")), arg.endswith("b")
        what = f"stem + {n} blocks frozen" if n else "nothing frozen"
        seconds = step_seconds(n, bf16, steps, name=name, device=device)
        print(f"{name} on {device}, {what}, bf16={bf16}: {seconds:.4f} s/step, {128 / seconds:.0f} images/s", flush=True)
