"""Training loop vs the student's raw step, side by side in one process (docs/benchmarks.md).

    python benchmarks/loop_throughput.py                      # the default job's student and batch
    python benchmarks/loop_throughput.py --steps 60 --rounds 1 # a quicker check
    python benchmarks/loop_throughput.py --device cuda

``raw``: the student alone, forward + backward + AdamW step, on one batch already in memory (no
data, no loss beyond a mean): the upper bound the loop can reach. ``loop`` and the other
variants (``--variants``): the real trainer,
``distill.train.main`` with ``configs/default.yaml`` (``resnet-cifar-m`` at 32 px, batch 128,
student flips and shifts, KL + feature losses) on real CIFAR-10 JPEGs from ``../shared/data``,
images/s read from its own ``train_log.jsonl`` (the first logging interval, which pays for
DataLoader start-up, is left out). The teacher is a tiny random CLIP with the reference teacher's
embedding width (512), so its targets cache in seconds; the loop reads cached targets, as the
default job does. Variants:

    loop            the trainer as the default job runs it (pixel store chosen by size: on for CIFAR)
    loop-decode     data.pixel_store=false: JPEGs decoded in the main process each step, the loop
                    as it was before the store (the path large datasets take with num_workers=0)
    loop-workers    data.pixel_store=false data.num_workers=2: decoding in 2 worker processes

Rounds alternate raw and the variants so that a neighbour's load on a shared CPU hits all of them;
each variant's ratio to raw is computed from the sums over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

CIFAR = REPO_ROOT.parent / "shared" / "data" / "cifar10"


def raw_images_per_s(student, batch_size: int, steps: int, device: str) -> float:
    """Forward + backward + AdamW of the student alone on one resident batch."""
    import torch

    student.train()
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    side = student.image_transform.output_size
    x = torch.randn(batch_size, 3, *side, device=device)

    def step():
        loss = student.encode_image(x).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch_size * steps / (time.perf_counter() - t0)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


VARIANTS = {"loop": [], "loop-decode": ["data.pixel_store=false"],
            "loop-workers": ["data.pixel_store=false", "data.num_workers=2"]}


def loop_images_per_s(args, teacher: Path, out: Path, extra: Sequence[str]) -> float:
    """The trainer's own images/s over its logging intervals after the first."""
    from accelerate.state import AcceleratorState

    from distill.train import main

    AcceleratorState._reset_state()
    log_every = max(1, args.steps // 6)
    main(["--config", str(REPO_ROOT / "configs" / "default.yaml"), f"teacher.name_or_path={teacher}",
          "teacher.build_recipe=null", "export.enabled=false", f"data.train={CIFAR}",
          f"data.train_limit={args.images}", "data.eval_limit=64", f"optim.max_steps={args.steps}",
          f"log_every={log_every}", "save_every=0", "progress=false", f"output_dir={out}",
          f"cache.dir={args.work / 'cache'}", f"cpu={str(args.device == 'cpu').lower()}", *extra])
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    AcceleratorState._reset_state()
    if len(rows) < 2:
        raise SystemExit(f"{out}: fewer than two logging intervals; raise --steps")
    images = [(r["step"] - p["step"]) * args.batch_size for p, r in zip(rows, rows[1:])]
    return sum(images) / sum(n / r["images_per_s"] for n, r in zip(images, rows[1:]))


def decode_cpu_ms(student, batch_size: int, batches: int = 10) -> float:
    """CPU milliseconds to decode, preprocess and collate one batch of CIFAR-10 JPEGs in one
    process (what the main process paid per step before the pixel store)."""
    from clipcore.augment import ViewSpec
    from clipcore.data import DataSpec, ImageDataset, collate, load_hf_dataset, resolve_columns
    from distill.train_data import TrainRows

    spec = DataSpec(str(CIFAR), split="train", limit=batch_size * batches, shuffle_seed=0)
    ds = load_hf_dataset(spec)
    images = TrainRows(len(ds), ViewSpec(), ImageDataset(ds, {"student": student.image_transform},
                                                         resolve_columns(ds, spec)))
    t0 = time.process_time()
    for b in range(batches):
        collate([images[b * batch_size + i] for i in range(batch_size)])
    return (time.process_time() - t0) * 1000 / batches


def build_models(work: Path, device: str):
    import torch

    from clipcore.loading import load_teacher
    from clipcore.testing import make_tiny_clip
    from students import build_student

    teacher_dir = work / "teacher"
    if not (teacher_dir / "config.json").exists():
        make_tiny_clip(teacher_dir, seed=1, projection_dim=512)
    teacher = load_teacher(str(teacher_dir), device=device)
    torch.manual_seed(0)
    student = build_student("resnet-cifar-m", teacher=teacher, image_size=32).to(device)
    return teacher_dir, student


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=120, help="steps per measurement (loop and raw)")
    p.add_argument("--rounds", type=int, default=2, help="raw/loop pairs, alternated")
    p.add_argument("--images", type=int, default=10240, help="CIFAR-10 training rows the loop reads (seeded)")
    p.add_argument("--batch-size", type=int, default=128, help="the default job's batch; keep it")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["loop", "loop-decode"])
    p.add_argument("--work", type=Path, default=REPO_ROOT / "outputs" / "bench-loop")
    p.add_argument("overrides", nargs="*", help="extra trainer key=value overrides for the loop runs")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    import torch

    args = parse_args(argv)
    if not CIFAR.exists():
        raise SystemExit(f"{CIFAR} not found: this benchmark needs ../shared/data beside the repo")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.device == "cpu":
        torch.set_num_threads(len(os.sched_getaffinity(0)))  # what the trainer's set_cpu_threads picks
    teacher_dir, student = build_models(args.work, args.device)
    decode_ms = decode_cpu_ms(student, args.batch_size)
    print(f"[bench] decoding + preprocessing + collating {args.batch_size} JPEGs: {decode_ms:.1f} CPU ms", flush=True)
    raws: list[float] = []
    loops: dict[str, list[float]] = {v: [] for v in args.variants}
    for r in range(args.rounds):
        raws.append(raw_images_per_s(student, args.batch_size, args.steps, args.device))
        print(f"[bench] round {r + 1}: raw {raws[-1]:.1f} images/s", flush=True)
        for v in args.variants:
            loops[v].append(loop_images_per_s(args, teacher_dir, args.work / f"{v}-{r}", VARIANTS[v] + args.overrides))
            print(f"[bench] round {r + 1}: {v} {loops[v][-1]:.1f} images/s", flush=True)
    result = {"command": "python benchmarks/loop_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "device": torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu x{torch.get_num_threads()}",
              "torch": torch.__version__, "loadavg_at_end": os.getloadavg(), "decode_cpu_ms_per_batch": decode_ms,
              "raw_images_per_s": raws, "loop_images_per_s": loops,
              "ratio_to_raw": {v: sum(x) / sum(raws) for v, x in loops.items()} if raws else {}}
    (args.work / "results.json").write_text(json.dumps(result, indent=2))
    if not raws:
        return result
    print(f"[bench] raw {sum(raws) / len(raws):.1f} images/s; " + "; ".join(
        f"{v} {sum(x) / len(x):.1f} images/s = {result['ratio_to_raw'][v]:.3f} of raw" for v, x in loops.items()))
    return result


if __name__ == "__main__":
    main()
