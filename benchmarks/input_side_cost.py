"""What an image student costs at each input side, against a FLOPs budget set by the teacher.

    python benchmarks/input_side_cost.py --teacher outputs/reference-zeroshot/final \\
        --student efficientnet-lite0-64 --student efficientnet-lite2-48 --sides 48,64,68,72,80,96,128

Issue 26 lets a general student choose its input side within 1/8 of the teacher's image FLOPs.
For each registered image student and side this builds the student (random weights: the cost does
not depend on them) and counts its image GFLOPs with :func:`clipcore.flops.image_gflops`, the same
counter ``distill.benchmark`` reports. EfficientNet's TF-style "same" padding makes the cost jump
where a side stops dividing evenly by the strides (a 2x2 last feature map becomes 3x3), so a few
pixels more can cost far more than their area. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
from typing import Sequence


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", help="a teacher directory or hub id: its GFLOPs set the budget")
    p.add_argument("--budget-fraction", type=float, default=1 / 8, help="share of the teacher's image GFLOPs")
    p.add_argument("--student", action="append", required=True, help="a registered image student (repeatable)")
    p.add_argument("--sides", default="64,96,128", help="comma list of square input sides")
    p.add_argument("--embed-dim", type=int, default=384, help="the head's output size when no --teacher is given")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    from clipcore.flops import image_gflops
    from students import build_student, load_model

    teacher = load_model(args.teacher) if args.teacher else None
    budget = image_gflops(teacher) * args.budget_fraction if teacher is not None else None
    sides = [int(s) for s in args.sides.split(",")]
    rows = []
    for name in args.student:
        for side in sides:
            student = build_student(name, teacher=teacher, embed_dim=None if teacher else args.embed_dim,
                                    image_size=side)
            rows.append({"student": name, "side": side, "gflops": image_gflops(student)})
    head = "| student | input side | image GFLOPs |" + (f" within {args.budget_fraction:.3g} of the teacher's "
                                                         f"({budget:.3f})? |" if budget else "")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        fits = "" if budget is None else (" yes |" if r["gflops"] <= budget else " no |")
        print(f"| {r['student']} | {r['side']} px | {r['gflops']:.3f} |{fits}")
    return rows


if __name__ == "__main__":
    main()
