"""distill/train.py's own loop under fp32, bf16 and fp16 (GradScaler), on whatever device Accelerate picks.

    PYTHONPATH=. python benchmarks/train_loop_precisions.py --steps 60           # a GPU machine: about 30 s
    PYTHONPATH=. python benchmarks/train_loop_precisions.py --steps 2 --cpu      # every code path on a CPU

``benchmarks/gpu_check.py`` checks mixed precision on a loop of its own; this runs the real entry point
(:func:`distill.train.main`: data, cached targets, losses, gradient accumulation, clipping, the LR schedule,
evaluation) on a tiny random teacher and student with generated images, so that nothing needs ``../shared``
or a download. Two tasks: a labelled set (class KL + feature loss) and a captioned one (+ CLIP and
interactive losses). One line a run: losses at ten points plus the mean of the last ten, peak GPU memory.
Needs the ``datasets`` package (carry it as a wheel where the machine lacks it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402

from clipcore.testing import make_tiny_clip  # noqa: E402
from distill.train import main  # noqa: E402
from tests.datagen import write_captions, write_labelled  # noqa: E402


def tasks(root: Path) -> dict[str, list[str]]:
    """The two tiny tasks' overrides, their data written under ``root``."""
    (root / "data").mkdir()
    write_labelled(root / "data", n=48)
    (root / "caps").mkdir()
    write_captions(root / "caps", n=24)
    return {"labelled": [f"data.train={root / 'data'}"],
            "captions+clip": [f"data.train={root / 'caps'}", "data.eval_split=train", "loss.clip_weight=1.0",
                              "loss.interactive_weight=1.0", "loss.kl_on_classes=false"]}


def run_once(root: Path, teacher: Path, name: str, extra: list[str], precision: str, steps: int,
             cpu: bool) -> dict:
    AcceleratorState._reset_state()  # one process-wide state: each run picks its own precision
    cuda = torch.cuda.is_available() and not cpu
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out = root / f"out-{name}-{precision}"
    start = time.perf_counter()
    main(["--config", str(root / "empty.yaml"), f"teacher.name_or_path={teacher}", "student.arch=test-tiny",
          "optim.batch_size=8", "optim.warmup_steps=1", "log_every=1", "progress=false", f"optim.max_steps={steps}",
          "optim.grad_accum=2", f"mixed_precision={precision}", f"cpu={str(cpu).lower()}", f"output_dir={out}",
          f"cache.dir={root / 'cache'}", *extra])
    losses = [json.loads(x)["loss"] for x in (out / "train_log.jsonl").read_text().splitlines()]
    return {"task": name, "precision": precision, "steps": len(losses),
            "losses": [round(v, 3) for v in losses[::max(1, len(losses) // 10)]],
            "last10_mean": round(sum(losses[-10:]) / len(losses[-10:]), 4),
            "finite": all(map(torch.isfinite, torch.tensor(losses))),
            "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
            "seconds": round(time.perf_counter() - start, 1)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--cpu", action="store_true", help="force the CPU even where a GPU is visible")
    parser.add_argument("--precisions", default="no,bf16,fp16")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows here as JSON")
    return parser.parse_args(argv)


def run(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="loop-precisions-"))
    teacher = make_tiny_clip(root / "teacher", seed=1)
    (root / "empty.yaml").write_text("{}\n")  # dataclass defaults, not the default recipe's ViT-B/32 teacher
    rows = []
    for name, extra in tasks(root).items():
        for precision in args.precisions.split(","):
            rows.append(run_once(root, teacher, name, extra, precision, args.steps, args.cpu))
            print(json.dumps(rows[-1]), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    run()
