"""Image-encoder latency on this CPU: torch vs onnxruntime fp32 / fp16 / int8, teacher vs students.

    python benchmarks/export_latency.py                 # full run (about 10 minutes on 2 cores)
    python benchmarks/export_latency.py --quick         # a smoke check of the script (tiny models)
    python benchmarks/export_latency.py --threads 1 --students resnet-18

Not a timed test: it records numbers for docs/benchmarks.md. Models have random weights (latency
does not depend on their values):

    teacher   the ViT-B/32 architecture of ../shared/data/clip-vit-base-patch32 (224 px)
    students  named entries of students.registry, built against that teacher (default
              vit-tiny-cifar at 32 px, mobilenetv2-1.0 and resnet-18 at 224 px)

Each model's image encoder (``encode_image``: pixels -> unit embeddings) runs as

    torch          eager, ``torch.inference_mode``
    fp32           exports.onnx_export.export_image_encoder, onnxruntime CPU (graph optimisation "all")
    fp16           exports.precision.convert_fp16 of that graph
    int8-dynamic   exports.precision.quantize_int8_dynamic (MatMul/Gemm weights; no calibration)
    int8-static    exports.precision.quantize_int8_static (QDQ, Conv/MatMul/Gemm), calibrated on
                   CIFAR-10 training images when ../shared/data is present, else on random pixels

at batch 1 and batch 32: ``--warmup`` untimed calls, then ``--iters`` (batch 1) or
``--batch-iters`` (batch 32) timed calls; median and p95 of the per-call wall time, numpy in,
embeddings out. torch and onnxruntime both use ``--threads`` intra-op threads; torch's OpenMP
workers wait passively (``OMP_WAIT_POLICY=PASSIVE`` unless set), see below.

Goals checked (at the same runtime and batch size):

* a student at most 1/10 of the teacher's latency (onnxruntime fp32, and torch);
* int8 at most 0.6 x the fp32 latency of the same model (onnxruntime).

CUDA / TensorRT rows are listed as not measured, with the reason from
:func:`exports.providers.detect`, when this machine cannot run them. Outputs:
``outputs/bench-export/export_latency[-quick].json`` and ``.md`` (the table also goes to stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(REPO_ROOT))

# Before torch loads OpenMP: on a CPU shared with other jobs, spinning OpenMP workers stall at
# every operator barrier whenever the other core is taken (measured here: 180 ms instead of
# 0.6 ms for a tiny ViT at 2 threads). Passive waiting costs little on an idle machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

DATA = Path("../shared/data")  # relative to the repo root, as in the default recipe
TEACHER = DATA / "clip-vit-base-patch32"
CIFAR = DATA / "cifar10"
DEFAULT_STUDENTS = ("vit-tiny-cifar", "mobilenetv2-1.0", "resnet-18")
QUICK_STUDENTS = ("test-tiny", "test-tiny-resnet")
RUNTIMES = ("torch", "fp32", "fp16", "int8-dynamic", "int8-static")
INT8 = ("int8-dynamic", "int8-static")
BATCHES = (1, 32)
STUDENT_GOAL = 0.1  # student latency / teacher latency
INT8_GOAL = 0.6  # int8 latency / fp32 latency


@dataclass
class Timing:
    batch: int
    iters: int
    median_ms: float
    p95_ms: float
    images_per_s: float  # batch / median


@dataclass
class Row:
    """One model at one runtime."""

    model: str
    role: str  # teacher | student
    runtime: str
    image_size: int
    params: int
    size_mb: float | None  # the .onnx file; parameters in memory for torch
    timings: dict[int, Timing] = field(default_factory=dict)
    status: str = "measured"  # measured | error | not measured
    reason: str | None = None


# ----------------------------------------------------------------------------- timing


def time_calls(fn: Callable[[], Any], warmup: int, iters: int) -> tuple[float, float]:
    """Median and p95 wall time of ``fn()`` in ms, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3), float(np.percentile(times, 95) * 1e3)


def measure(fn: Callable[[np.ndarray], Any], image_size: int, args: argparse.Namespace) -> dict[int, Timing]:
    """Batch-1 and batch-32 timings of ``fn`` on fixed random pixels."""
    rng = np.random.default_rng(0)
    out = {}
    for batch in BATCHES:
        pixels = rng.standard_normal((batch, 3, image_size, image_size), dtype=np.float32)
        iters = args.iters if batch == 1 else args.batch_iters
        # batch 32 gets fewer warm-up calls: each is up to seconds for ViT-B, and one call is
        # enough for allocators and kernel choices at a new shape
        warmup = args.warmup if batch == 1 else min(args.warmup, 2)
        median, p95 = time_calls(lambda: fn(pixels), warmup, iters)
        out[batch] = Timing(batch, iters, median, p95, batch / (median / 1e3))
    return out


def torch_runner(model) -> Callable[[np.ndarray], Any]:
    def run(pixels: np.ndarray):
        with torch.inference_mode():
            return model.encode_image(torch.from_numpy(pixels))

    return run


def ort_runner(path: Path, threads: int) -> Callable[[np.ndarray], Any]:
    from exports.interface import IMAGE_ENCODER
    from exports.runtime import OnnxGraph

    graph = OnnxGraph(path, IMAGE_ENCODER, threads=threads)
    name, out = IMAGE_ENCODER.inputs[0].name, IMAGE_ENCODER.outputs[0].name
    return lambda pixels: graph.run({name: pixels}, [out])


# ----------------------------------------------------------------------------- models and variants


def load_models(args: argparse.Namespace, work: Path) -> list[tuple[str, str, Any]]:
    """``[(name, role, model)]``: the teacher first, then the students, all in eval mode."""
    from clipcore.loading import load_teacher
    from students import build_student

    if args.quick:  # tiny random CLIP: no shared data needed, seconds instead of minutes
        from clipcore.testing import make_tiny_clip

        teacher = load_teacher(str(make_tiny_clip(work / "tiny-teacher", seed=0)))
        teacher_name = "tiny CLIP (test config)"
    else:
        if not TEACHER.is_dir():
            sys.exit(f"error: {TEACHER.resolve()} is absent; the full run needs the ViT-B/32 config "
                     "(use --quick for a smoke run without it)")
        teacher = load_teacher(str(TEACHER), random_init=True)
        teacher_name = "ViT-B/32 (clip-vit-base-patch32 architecture)"
    models = [(teacher_name, "teacher", teacher)]
    for name in args.students:
        models.append((name, "student", build_student(name, teacher=teacher).eval()))
    return models


def calibration(model, args: argparse.Namespace):
    """int8-static calibration batches: real CIFAR-10 training images when present."""
    from exports.precision import ArrayCalibrationReader, ImageCalibrationReader

    if CIFAR.is_dir() and not args.quick:
        from clipcore.data import DataSpec, load_hf_dataset

        ds = load_hf_dataset(DataSpec(str(CIFAR), split="train", limit=args.calibration_images, shuffle_seed=0))
        column = "img" if "img" in ds.column_names else "image"
        return ImageCalibrationReader(list(ds[column]), model.image_transform, batch_size=8), "CIFAR-10 train"
    h, w = model.image_transform.output_size
    rng = np.random.default_rng(0)
    batches = [{"pixel_values": rng.standard_normal((8, 3, h, w), dtype=np.float32)}
               for _ in range(max(1, args.calibration_images // 8))]
    return ArrayCalibrationReader(batches), "random pixels"


def build_variants(model, name: str, out_dir: Path, args: argparse.Namespace) -> tuple[dict[str, Path | str], str]:
    """``{runtime: .onnx path, or the error text}`` for every ONNX runtime, and the calibration source."""
    from exports.onnx_export import export_image_encoder
    from exports.precision import make_variant

    stem = out_dir / name.replace("/", "_").replace(" ", "_")
    fp32 = export_image_encoder(model, stem.with_suffix(".fp32.onnx"))
    paths: dict[str, Path | str] = {"fp32": fp32}
    source = "-"
    for precision in ("fp16", *INT8):
        try:
            reader = None
            if precision == "int8-static":
                reader, source = calibration(model, args)
            paths[precision] = make_variant(fp32, stem.with_suffix(f".{precision}.onnx"), precision, reader)
        except Exception as exc:  # a converter failure is a result to report, not a crash
            paths[precision] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return paths, source


def measure_model(name: str, role: str, model, out_dir: Path, args: argparse.Namespace) -> tuple[list[Row], str]:
    from clipcore.flops import image_parameters

    size = model.image_transform.output_size[0]
    params = image_parameters(model)
    print(f"[bench] {name}: exporting and quantising", flush=True)
    paths, source = build_variants(model, name, out_dir, args)
    rows = []
    for runtime in RUNTIMES:
        row = Row(name, role, runtime, size, params, None)
        print(f"[bench] {name}: {runtime}", flush=True)
        if runtime == "torch":
            row.size_mb = params * 4 / 2**20  # fp32 image-tower parameters, in memory
            row.timings = measure(torch_runner(model), size, args)
        elif isinstance(paths[runtime], str):
            row.status, row.reason = "error", paths[runtime]
        else:
            row.size_mb = paths[runtime].stat().st_size / 2**20
            row.timings = measure(ort_runner(paths[runtime], args.threads), size, args)
        rows.append(row)
    return rows, source


def accelerated_rows() -> list[dict[str, str]]:
    """The GPU paths of exports.providers, with why each was not measured here."""
    from exports import providers

    info = providers.detect()
    out = []
    for variant in providers.ACCELERATED_VARIANTS:
        reason = info.skip_reason(variant)
        out.append({"runtime": variant, "status": "not measured" if reason else "not run by this script",
                    "reason": reason or "a GPU is present: use python -m exports.parity, which times GPU variants"})
    return out


# ----------------------------------------------------------------------------- goals and output


def latency(rows: Sequence[Row], model: str, runtime: str, batch: int) -> float | None:
    for r in rows:
        if r.model == model and r.runtime == runtime and batch in r.timings:
            return r.timings[batch].median_ms
    return None


def ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None else num / den


def goals(rows: Sequence[Row]) -> dict[str, Any]:
    """Student/teacher and int8/fp32 latency ratios (medians), each with its verdict."""
    teacher = next(r.model for r in rows if r.role == "teacher")
    students = list(dict.fromkeys(r.model for r in rows if r.role == "student"))
    student_checks = [
        {"student": s, "runtime": rt, "batch": b,
         "ratio": ratio(latency(rows, s, rt, b), latency(rows, teacher, rt, b))}
        for s in students for rt in ("fp32", "torch") for b in BATCHES
    ]
    int8_checks = [
        {"model": m, "scheme": q, "batch": b, "ratio": ratio(latency(rows, m, q, b), latency(rows, m, "fp32", b))}
        for m in [teacher, *students] for q in INT8 for b in BATCHES
    ]
    for check, goal in [(c, STUDENT_GOAL) for c in student_checks] + [(c, INT8_GOAL) for c in int8_checks]:
        check["met"] = None if check["ratio"] is None else check["ratio"] <= goal
    return {
        "student_at_most_tenth_of_teacher": {"goal": STUDENT_GOAL, "checks": student_checks,
                                             "met_by": sorted({c["student"] for c in student_checks
                                                               if c["runtime"] == "fp32" and c["met"]
                                                               and _met_at_both(student_checks, c["student"], "fp32")})},
        "int8_at_most_0.6_of_fp32": {"goal": INT8_GOAL, "checks": int8_checks},
    }


def _met_at_both(checks: Sequence[dict], student: str, runtime: str) -> bool:
    return all(c["met"] for c in checks if c["student"] == student and c["runtime"] == runtime)


def _f(v: float | None, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def markdown_table(rows: Sequence[Row]) -> str:
    lines = ["| model | px | params M | runtime | size MB | b1 median ms | b1 p95 ms | b32 median ms | b32 p95 ms | "
             "b32 img/s | × fp32 (b1 / b32) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t1, t32 = r.timings.get(1), r.timings.get(32)
        rel = "-"
        if r.runtime != "fp32" and t1 and t32:
            rel = (f"{_f(ratio(t1.median_ms, latency(rows, r.model, 'fp32', 1)))} / "
                   f"{_f(ratio(t32.median_ms, latency(rows, r.model, 'fp32', 32)))}")
        runtime = r.runtime if r.status == "measured" else f"{r.runtime} ({r.status}: {r.reason})"
        lines.append(f"| {r.model} | {r.image_size} | {r.params / 1e6:.2f} | {runtime} | {_f(r.size_mb, '.1f')} | "
                     f"{_f(t1 and t1.median_ms)} | {_f(t1 and t1.p95_ms)} | {_f(t32 and t32.median_ms, '.1f')} | "
                     f"{_f(t32 and t32.p95_ms, '.1f')} | {_f(t32 and t32.images_per_s, '.1f')} | {rel} |")
    return "\n".join(lines)


def goal_lines(result: dict[str, Any]) -> list[str]:
    g = result["goals"]
    out = []
    by_student: dict[str, list[str]] = {}
    for c in g["student_at_most_tenth_of_teacher"]["checks"]:
        by_student.setdefault(c["student"], []).append(
            f"{c['runtime']} b{c['batch']} {_f(c['ratio'], '.3f')} ({'met' if c['met'] else 'not met'})")
    for s, parts in by_student.items():
        out.append(f"- student/teacher latency, {s}: " + ", ".join(parts))
    met_by = g["student_at_most_tenth_of_teacher"]["met_by"]
    out.append(f"- **goal student ≤ 1/10 of teacher (onnxruntime fp32, batch 1 and 32): "
               f"{'met by ' + ', '.join(met_by) if met_by else 'not met'}**")
    for c in g["int8_at_most_0.6_of_fp32"]["checks"]:
        out.append(f"- int8/fp32 latency, {c['model']} {c['scheme']} b{c['batch']}: {_f(c['ratio'], '.2f')} "
                   f"({'met' if c['met'] else 'not met' if c['met'] is not None else 'not measured'})")
    models_met = sorted({c["model"] for c in g["int8_at_most_0.6_of_fp32"]["checks"] if c["met"]})
    out.append(f"- **goal int8 ≤ 0.6 × fp32 (any int8 scheme, either batch): "
               f"{'met for ' + ', '.join(models_met) if models_met else 'not met for any model'}**")
    for a in result["accelerated"]:
        out.append(f"- {a['runtime']}: {a['status']} ({a['reason']})")
    return out


def machine(threads: int) -> dict[str, Any]:
    import onnxruntime

    cpu = platform.processor() or "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.lower().startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "load_average_before": list(os.getloadavg())}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models, few iterations: checks the script runs")
    p.add_argument("--students", nargs="+", default=None, help=f"registry names (default {' '.join(DEFAULT_STUDENTS)})")
    p.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads (default 2)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=30, help="timed batch-1 calls")
    p.add_argument("--batch-iters", type=int, default=8, help="timed batch-32 calls")
    p.add_argument("--calibration-images", type=int, default=32, help="int8-static calibration images")
    p.add_argument("--out", default="outputs/bench-export")
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.iters, args.batch_iters, args.calibration_images = 1, 3, 2, 8
    args.students = args.students or list(QUICK_STUDENTS if args.quick else DEFAULT_STUDENTS)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.chdir(REPO_ROOT)  # ../shared/data and outputs/ are relative to the repo root
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    info = machine(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    calibrations = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        for name, role, model in load_models(args, Path(tmp)):
            model_rows, calibrations[name] = measure_model(name, role, model, Path(tmp), args)
            rows += model_rows
    info["load_average_after"] = list(os.getloadavg())
    result = {
        "command": "python benchmarks/export_latency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": info, "settings": {k: v for k, v in vars(args).items()},
        "wall_s": time.perf_counter() - start, "int8_static_calibration": calibrations,
        "rows": [asdict(r) for r in rows], "accelerated": accelerated_rows(),
    }
    result["goals"] = goals(rows)
    table = markdown_table(rows)
    text = "\n".join([table, "", *goal_lines(result)]) + "\n"
    stem = out_dir / ("export_latency-quick" if args.quick else "export_latency")
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')} "
          f"(load average before {info['load_average_before'][0]:.2f}, after {info['load_average_after'][0]:.2f})")
    return result


if __name__ == "__main__":
    main()
