"""Training throughput of the distillation trainer: teacher online vs cached targets, 1 vs 2 processes.

    python benchmarks/train_throughput.py                  # full CPU run (several minutes on 2 cores)
    python benchmarks/train_throughput.py --quick          # a smoke check of the script itself
    python benchmarks/train_throughput.py --device cuda --precisions no bf16 fp16

Not a timed test: it records numbers for docs/benchmarks.md. Every measurement is one real
``distill.train.main([...])`` run, one epoch over the first N CIFAR-10 training images, with the
ViT-B/32 teacher architecture (random weights, real tokenizer) from ``../shared/data``:

    online   cache.enabled=false: the teacher embeds every batch inside the loop
    cold     cache.enabled=true on an empty cache directory: the cache is built first, then the loop
    warm     cache.enabled=true again: a cache hit, the loop reads the stored targets
    2 procs  the warm run under ``torch.distributed.run --nproc_per_node 2`` (CPU: gloo)

Each run is a fresh Python process (Accelerate keeps process-wide state, and a fresh process
makes 1- and 2-process runs pay the same start-up); inside it ``distill.train.main`` runs
in-process with two timing hooks (set-up and cache build/load). Times reported per run:

    epoch_s     the training loop alone, summed from the trainer's own ``train_log.jsonl``
                (``log_every=1``: one line per step with that step's images/s)
    setup_s     teacher + student + data + text bank (+ cache build or load), before the loop
    cache_s     inside setup: building (cold) or loading (warm) the teacher-target cache
    wall_s      the whole process, imports and final checkpoint/evaluation included

Outputs go to ``outputs/bench-train/<run id>/`` (``results.json``, ``results.md`` and one
trainer output directory per run); the cache lives in ``outputs/bench-cache/<run id>`` and is
deleted at the end unless ``--keep-cache``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script, also by torch.distributed.run
    sys.path.insert(0, str(REPO_ROOT))

DATA = Path("../shared/data")  # relative to the repo root, as in the default recipe
TEACHER = DATA / "clip-vit-base-patch32"
CIFAR = DATA / "cifar10"


# ------------------------------------------------------------------------------- worker process


def worker(spec_path: str) -> None:
    """One trainer run with timing hooks; rank 0 writes ``timing.json`` beside the run's outputs."""
    import torch

    import distill.train as train_mod
    import distill.train_data as train_data

    spec = json.loads(Path(spec_path).read_text())
    times: dict[str, float] = {}
    rank = int(os.environ.get("RANK", "0"))

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times[name] = times.get(name, 0.0) + time.perf_counter() - t0
        return wrapper

    # Hooks only wrap, they change nothing: set-up (everything before the loop) and the cache.
    train_mod.build_task = timed("setup_s", train_mod.build_task)
    cache_cls = train_data.TeacherTargetCache
    cache_cls.get_or_build = timed("cache_s", cache_cls.get_or_build)

    cuda = torch.cuda.is_available() and spec["device"] == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    train_mod.main(spec["argv"])
    times["main_s"] = time.perf_counter() - t0
    out = {
        "rank": rank,
        "times": times,
        "torch_threads": torch.get_num_threads(),
        # Linux reports ru_maxrss in KiB: the peak resident memory of this process
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }
    Path(spec["output_dir"], f"timing-r{rank}.json").write_text(json.dumps(out, indent=2))


# ------------------------------------------------------------------------------- parent process


def trainer_argv(args, label: str, out_dir: Path, cache: bool, cache_dir: Path, precision: str,
                 batch_size: int, processes: int) -> list[str]:
    steps = args.images // (batch_size * processes)
    return [
        "--config", str(REPO_ROOT / "configs" / "vit_b32_random.yaml"), "export.enabled=false",
        f"output_dir={out_dir}",
        f"teacher.name_or_path={TEACHER}", "teacher.random_init=true", "teacher.build_recipe=null",
        f"student.arch={args.student}", f"student.image_size={args.image_size}",
        f"data.train={CIFAR}", f"data.train_limit={args.images}", f"data.eval_limit={args.eval_limit}",
        f"optim.batch_size={batch_size}", f"optim.max_steps={steps}", f"optim.warmup_steps={min(10, steps)}",
        f"cache.enabled={str(cache).lower()}", f"cache.dir={cache_dir}",
        f"mixed_precision={precision}", f"cpu={str(args.device == 'cpu').lower()}",
        "log_every=1", "save_every=0", "eval_every=0", "progress=false",
    ]


def read_train_log(path: Path, batch_size: int, processes: int) -> dict:
    """Loop time and images/s from the trainer's per-step log (one line per step with log_every=1)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    per_step = batch_size * processes
    prev, times = 0, []
    for row in rows:
        images = (row["step"] - prev) * per_step
        times.append(images / row["images_per_s"])
        prev = row["step"]
    images = rows[-1]["step"] * per_step
    steady = times[1:] or times  # the first step also pays for DataLoader start and first-call allocations
    return {
        "steps": rows[-1]["step"],
        "images": images,
        "epoch_s": sum(times),
        "images_per_s": images / sum(times),
        "steady_images_per_s": per_step * len(steady) / sum(steady),
        "first_step_s": times[0],
    }


def run_one(args, run_root: Path, label: str, *, cache: bool, cache_dir: Path, precision: str,
            processes: int) -> dict:
    batch_size = args.batch_size // processes  # the same global batch (and contrastive negatives) either way
    out_dir = run_root / label
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    spec = {"argv": trainer_argv(args, label, out_dir, cache, cache_dir, precision, batch_size, processes),
            "output_dir": str(out_dir), "device": args.device}
    spec_path = out_dir / "bench_spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    script = str(Path(__file__).resolve())
    env = dict(os.environ)
    if processes == 1:
        cmd = [sys.executable, script, "--worker", str(spec_path)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               script, "--worker", str(spec_path)]
        if args.device == "cpu":  # split the cores between the processes instead of oversubscribing them
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // processes)))
    print(f"[bench] {label}: {' '.join(cmd[1:3])} ... ({processes} proc, batch {batch_size}/proc, "
          f"cache={'on' if cache else 'off'}, precision={precision})", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    (out_dir / "stdout.log").write_text(proc.stdout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-40:])
        raise RuntimeError(f"{label} failed (exit {proc.returncode}); log {out_dir / 'stdout.log'}:\n{tail}")
    timing = [json.loads(p.read_text()) for p in sorted(out_dir.glob("timing-r*.json"))]
    row = {"label": label, "processes": processes, "batch_per_process": batch_size, "cache": cache,
           "precision": precision, "wall_s": wall, **read_train_log(out_dir / "train_log.jsonl", batch_size, processes)}
    main = timing[0]
    row.update(setup_s=main["times"].get("setup_s"), cache_s=main["times"].get("cache_s"),
               main_s=main["times"].get("main_s"), torch_threads=main["torch_threads"],
               peak_rss_mib=max(t["peak_rss_mib"] for t in timing),
               peak_cuda_mib=max((t["peak_cuda_mib"] or 0) for t in timing) if args.device == "cuda" else None)
    print(f"[bench] {label}: epoch {row['epoch_s']:.1f} s, {row['images_per_s']:.1f} img/s "
          f"(steady {row['steady_images_per_s']:.1f}), setup {row['setup_s']:.1f} s, wall {wall:.1f} s", flush=True)
    return row


def _fmt(v, digits=1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def markdown_table(rows: list[dict], device: str) -> str:
    mem = "peak CUDA MiB" if device == "cuda" else "peak RSS MiB/proc"
    lines = [f"| run | precision | procs x batch | teacher | epoch s | images/s | steady images/s | "
             f"cache build/load s | setup s | process wall s | {mem} |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        teacher = "cached" if r["cache"] else "online"
        lines.append(
            f"| {r['label']} | {r['precision']} | {r['processes']} x {r['batch_per_process']} | {teacher} | "
            f"{_fmt(r['epoch_s'])} | {_fmt(r['images_per_s'])} | {_fmt(r['steady_images_per_s'])} | "
            f"{_fmt(r['cache_s'])} | {_fmt(r['setup_s'])} | {_fmt(r['wall_s'])} | "
            f"{_fmt(r['peak_cuda_mib'] if device == 'cuda' else r['peak_rss_mib'], 0)} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> list[str]:
    """Ratios behind the goal (cached epoch <= 1/3 of an online one), per precision."""
    out = []
    for precision in dict.fromkeys(r["precision"] for r in rows):
        pick = lambda prefix, procs=1: [r["epoch_s"] for r in rows if r["precision"] == precision and  # noqa: E731
                                        r["label"].split("-")[0] == prefix and r["processes"] == procs]
        online, warm, cold = pick("online"), pick("warm"), [r for r in rows if r["precision"] == precision
                                                             and r["label"].startswith("cold")]
        if online and warm:
            ratios = [w / o for o, w in zip(online, warm)]
            best = min(warm) / min(online)
            out.append(f"{precision}: cached (warm) epoch / online epoch = "
                       f"{', '.join(f'{x:.2f}' for x in ratios)} per repeat (best-of: {best:.2f}); "
                       f"goal <= 0.33 {'holds' if max(ratios) <= 1 / 3 else 'does NOT hold'}")
        if online and cold:
            c = cold[0]
            out.append(f"{precision}: cold = cache build {c['cache_s']:.1f} s + epoch {c['epoch_s']:.1f} s "
                       f"= {(c['cache_s'] + c['epoch_s']) / min(online):.2f} x an online epoch")
        two, one = pick("warm", 2), pick("warm")
        if two and one:
            out.append(f"{precision}: 2 processes / 1 process epoch (cached) = {min(two) / min(one):.2f}")
    return out


def machine() -> dict:
    import torch

    model = platform.processor() or ""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    info = {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "loadavg_at_start": os.getloadavg()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="128 images, 64 px student, no repeat: checks the script")
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=64, help="global batch (split across processes)")
    p.add_argument("--student", default="vit-tiny-16")
    p.add_argument("--image-size", type=int, default=224, help="student input side (the teacher's is its own, 224)")
    p.add_argument("--eval-limit", type=int, default=32, help="the trainer's end-of-run evaluation (not timed)")
    p.add_argument("--repeats", type=int, default=2, help="times to measure the online / warm pair")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--precisions", nargs="+", choices=["no", "bf16", "fp16"], default=None,
                   help="default: no on CPU; no bf16 fp16 on CUDA")
    p.add_argument("--out", default="outputs/bench-train")
    p.add_argument("--keep-cache", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.batch_size, args.image_size, args.repeats, args.eval_limit = 128, 32, 64, 1, 16
    args.precisions = args.precisions or (["no", "bf16", "fp16"] if args.device == "cuda" else ["no"])
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker)
        return {}
    for path in (TEACHER, CIFAR):
        if not (REPO_ROOT / path).exists():
            raise SystemExit(f"{path} not found (relative to {REPO_ROOT}): this benchmark needs ../shared/data")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device visible")
    for procs in args.processes:
        if args.images % args.batch_size or args.batch_size % procs:
            raise SystemExit(f"--images {args.images} must be a multiple of --batch-size {args.batch_size}, "
                             f"itself a multiple of {procs} processes")
    run_id = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    run_root = REPO_ROOT / args.out / run_id
    cache_root = REPO_ROOT / "outputs" / "bench-cache"
    cache_dir = cache_root / run_id
    run_root.mkdir(parents=True)
    info = machine()
    print(f"[bench] {info}; outputs in {run_root}", flush=True)
    rows: list[dict] = []
    try:
        for precision in args.precisions:
            tag = "" if precision == "no" else f"-{precision}"
            shutil.rmtree(cache_dir, ignore_errors=True)  # the cold run must build from nothing
            kw = dict(cache_dir=cache_dir, precision=precision)
            for i in range(args.repeats):
                rows.append(run_one(args, run_root, f"online{tag}-{i + 1}", cache=False, processes=1, **kw))
                if i == 0:
                    rows.append(run_one(args, run_root, f"cold{tag}", cache=True, processes=1, **kw))
                rows.append(run_one(args, run_root, f"warm{tag}-{i + 1}", cache=True, processes=1, **kw))
            # several processes on one GPU measure contention, not scaling: only where there are enough
            multi = args.device == "cpu" or _cuda_count() >= max(args.processes)
            for procs in (p for p in args.processes if p > 1 and multi):
                rows.append(run_one(args, run_root, f"warm{tag}-{procs}proc", cache=True, processes=procs, **kw))
    finally:
        if not args.keep_cache:
            shutil.rmtree(cache_dir, ignore_errors=True)
    info["loadavg_at_end"] = os.getloadavg()
    command = "python benchmarks/train_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"command": command.strip(), "machine": info, "settings": {k: v for k, v in vars(args).items() if k != "worker"},
              "runs": rows, "summary": summary(rows)}
    table = markdown_table(rows, args.device)
    (run_root / "results.json").write_text(json.dumps(result, indent=2))
    (run_root / "results.md").write_text(f"`{result['command']}`\n\n{info}\n\n{table}\n\n" +
                                         "\n".join(f"- {s}" for s in result["summary"]) + "\n")
    print(table)
    print("\n".join(result["summary"]))
    print(f"[bench] wrote {run_root / 'results.json'} and results.md")
    return result


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count()


if __name__ == "__main__":
    main()
