"""One-call GPU check: mixed-precision correctness, NCCL loss parity, training and export speed.

    PYTHONPATH=. python benchmarks/gpu_check.py --out DIR                 # on a GPU machine, <= 8 min
    PYTHONPATH=. python benchmarks/gpu_check.py --device cpu --quick --out DIR   # every code path, < 1 min

Runs from a plain checkout with the machine's own torch and transformers: no install, no
download. The teacher is CLIP ViT-B/32 with random weights, its config read from
``../shared/data/clip-vit-base-patch32`` when that folder exists and otherwise built in code
(``CLIPConfig()``'s defaults are ViT-B/32). ``--quick`` shrinks the teacher, batches and step
counts so that the same code runs on a CPU in under a minute (tests/test_gpu_check.py).

Writes ``DIR/gpu_check.json`` and ``DIR/gpu_check.md``, one row per check:

* correctness: a short distillation of ``resnet-cifar-m`` on the teacher's targets under fp32,
  bf16 autocast and fp16 autocast with ``GradScaler``, from the same weights, fitting one batch; the
  mixed-precision loss curve must stay within a stated relative tolerance of fp32, with no NaN;
* distributed: with >= 2 GPUs, two processes over NCCL compute the CLIP loss on their halves of a
  batch with :func:`clipcore.dist.gather_with_grad`; loss and gradients must match one process on
  the whole batch (on a CPU run: gloo, the same code);
* speed: training images/s and peak memory (model, optimizer, activations; not the input batches)
  of ``resnet-cifar-m`` (32 px), ``vit-tiny-16`` and ``mobilenetv2-1.0`` (224 px) at bf16 and
  fp32, with the teacher's targets cached (read from memory) and online (the teacher runs in the
  loop); teacher inference images/s at batch 256 in bf16, the ceiling any online-teacher figure is
  bounded by;
* export: one student's image encoder in torch on the device vs ONNX Runtime on every provider
  this onnxruntime has (CPU; CUDA and TensorRT EPs) and a TensorRT engine: images/s and the
  largest embedding difference from torch fp32.

Anything the machine lacks (CUDA, bf16, a second GPU, an onnxruntime provider, tensorrt) is a
``skipped: reason`` row, never a crash; a check that runs and fails is a ``failed`` row and the
exit status is 1. Rows past the time budget (``--budget-s``) are skipped, saying so.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script, also in the spawned distributed workers
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TEACHER_DIR = REPO_ROOT.parent / "shared" / "data" / "clip-vit-base-patch32"
SPEED_STUDENTS = (("resnet-cifar-m", 32), ("vit-tiny-16", 224), ("mobilenetv2-1.0", 224))
CORRECTNESS_STUDENT = ("resnet-cifar-m", 32)
EXPORT_STUDENT = ("mobilenetv2-1.0", 224)
# max over steps of |loss_amp - loss_fp32| / |loss_fp32| (bf16 keeps 8 mantissa bits, fp16 11; the
# early steps of a freshly initialised student with batch norm amplify rounding), and the loss must
# fall by at least MIN_DROP_RATIO of fp32's fall (fp16 gradients underflowing without GradScaler stall)
# bf16 0.12: the quick CPU run measured 0.102 on a Zen 1 CPU (no native bf16) with the same loss drop as fp32
LOSS_TOLERANCE = {"bf16": 0.12, "fp16": 0.10}
MIN_DROP_RATIO = 0.5
AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CLASSES = 10
SECTIONS = ("correctness", "distributed", "speed", "export")
TEXT_LENGTH = 16


class Skipped(Exception):
    """The check cannot run here; the message is the reason."""


@dataclass(frozen=True)
class Settings:
    """Sizes of one run; ``--quick`` swaps in the tiny ones."""

    corr_steps: int = 40
    corr_batch: int = 64
    speed_batch: int = 256
    speed_steps: int = 10
    warmup: int = 3
    teacher_batch: int = 256
    teacher_iters: int = 10
    export_batch: int = 32
    export_iters: int = 20
    dist_batch: int = 8  # per process
    tiny_teacher: bool = False
    max_image_size: int = 224  # --quick: every student at 32 px, the teacher at 64 px

    @classmethod
    def quick(cls) -> "Settings":
        return cls(corr_steps=5, corr_batch=8, speed_batch=2, speed_steps=1, warmup=1, teacher_batch=2,
                   teacher_iters=1, export_batch=2, export_iters=1, dist_batch=2, tiny_teacher=True,
                   max_image_size=32)

    def size(self, native: int) -> int:
        return min(native, self.max_image_size)


@dataclass
class Row:
    section: str
    name: str
    status: str  # ok | failed | skipped
    reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        numbers = ", ".join(f"{k} {_fmt(v)}" for k, v in self.metrics.items())
        tail = f"skipped: {self.reason}" if self.status == "skipped" else (
            f"FAILED: {self.reason}" if self.status == "failed" else "ok")
        return f"| {self.section} | {self.name} | {tail} | {numbers} |"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


class Runner:
    """Runs checks one by one, turning every outcome into a :class:`Row`."""

    def __init__(self, budget_s: float):
        self.rows: list[Row] = []
        self.deadline = time.monotonic() + budget_s

    def run(self, section: str, name: str, fn: Callable[[], dict[str, Any]], ok: Callable[[dict], str | None] = None):
        if time.monotonic() > self.deadline:
            self.rows.append(Row(section, name, "skipped", "time budget (--budget-s) used up"))
            return
        try:
            metrics = fn()
        except Skipped as exc:
            self.rows.append(Row(section, name, "skipped", str(exc)))
            return
        except Exception as exc:  # a crash of one check is a failed row, the others still run
            where = traceback.extract_tb(exc.__traceback__)[-1]
            self.rows.append(Row(section, name, "failed",
                                 f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''} "
                                 f"({Path(where.filename).name}:{where.lineno})"))
            return
        problem = ok(metrics) if ok else None
        self.rows.append(Row(section, name, "failed" if problem else "ok", problem or "", metrics))


# ---------------------------------------------------------------------------------- environment


def environment(device: torch.device, settings: "Settings") -> dict[str, Any]:
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "device": str(device),
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "teacher_config": "tiny (--quick)" if settings.tiny_teacher else (
            str(TEACHER_DIR) if TEACHER_DIR.is_dir() else "CLIPConfig() defaults (ViT-B/32), built in code"),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["bf16_supported"] = torch.cuda.is_bf16_supported()
    try:
        import onnxruntime as ort

        env["onnxruntime"] = ort.__version__
        env["ort_providers"] = ort.get_available_providers()
    except ImportError:
        env["onnxruntime"] = None
    return env


def check_precision(device: torch.device, precision: str) -> None:
    """Raise :class:`Skipped` when ``precision`` cannot run on ``device``."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise Skipped(f"{torch.cuda.get_device_name(device)} has no bf16 support")


def autocast(device: torch.device, precision: str):
    dtype = AMP_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def peak_mb(device: torch.device, base: int = 0) -> float | str:
    """Peak CUDA memory since the last :func:`reset_peak`, less ``base`` bytes held before."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return "n/a (CPU)"


# -------------------------------------------------------------------------------------- teacher


def teacher_config(tiny: bool):
    from transformers import CLIPConfig

    from clipcore.testing import tiny_clip_config

    if tiny:  # ViT-B/32's patch and embedding sizes, a few thousand parameters, 64 px
        return tiny_clip_config(vocab_size=49408, image_size=64, patch_size=32, projection_dim=512,
                                max_length=TEXT_LENGTH)
    if TEACHER_DIR.is_dir():
        return CLIPConfig.from_pretrained(TEACHER_DIR)
    return CLIPConfig()


@dataclass
class Teacher:
    model: torch.nn.Module
    class_emb: torch.Tensor  # (C, D), unit norm
    scale: float

    @property
    def dim(self) -> int:
        return int(self.class_emb.shape[1])

    @torch.no_grad()
    def image_emb(self, pixels: torch.Tensor) -> torch.Tensor:
        from clipcore import compat

        return F.normalize(compat.image_features(self.model, pixels).float(), dim=-1)


def build_teacher(device: torch.device, tiny: bool) -> Teacher:
    from transformers import CLIPModel

    from clipcore import compat

    torch.manual_seed(0)
    config = teacher_config(tiny)
    model = CLIPModel(config).to(device).eval()
    text_cfg = config.text_config
    g = torch.Generator().manual_seed(1)
    length = min(TEXT_LENGTH, text_cfg.max_position_embeddings)
    ids = torch.randint(0, text_cfg.vocab_size - 2, (CLASSES, length), generator=g)
    ids[:, -1] = text_cfg.eos_token_id  # CLIP pools at the end-of-text token
    with torch.no_grad():
        text = compat.text_features(model, ids.to(device), torch.ones_like(ids).to(device))
    return Teacher(model, F.normalize(text.float(), dim=-1), float(model.logit_scale.detach().exp()))


# ------------------------------------------------------------------------------------- training


def build_image_student(name: str, image_size: int, embed_dim: int, device: torch.device, tok_dir: Path):
    from students import ClipStudentConfig, build_student, get_student_config

    cfg = get_student_config(name)
    tokenizer = str(tok_dir) if isinstance(cfg, ClipStudentConfig) else None  # CLIP students need one
    torch.manual_seed(0)
    student = build_student(name, embed_dim=embed_dim, tokenizer=tokenizer, image_size=image_size)
    return student.to(device).train()


class Trainable(torch.nn.Module):
    """The student and the logit scale: what the optimizer owns."""

    def __init__(self, student):
        super().__init__()
        self.student = student
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))


def distill_step(model: Trainable, teacher: Teacher, loss_fn, pixels: torch.Tensor, teacher_image: torch.Tensor,
                 labels: torch.Tensor) -> torch.Tensor:
    from clipcore.losses import total_loss

    image = model.student.image_features(pixels)
    losses = loss_fn(student_image=image.float(), teacher_image=teacher_image, teacher_text=teacher.class_emb[labels],
                     teacher_class=teacher.class_emb, student_log_scale=model.log_scale, teacher_scale=teacher.scale)
    return total_loss(losses)


def batches(n: int, batch: int, teacher_size: int, student_size: int, device: torch.device, seed: int = 0):
    """``n`` seeded batches: (teacher pixels, student pixels, labels)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        big = torch.randn(batch, 3, teacher_size, teacher_size, generator=g)
        small = big if student_size == teacher_size else F.interpolate(big, size=student_size, mode="bilinear",
                                                                         antialias=True, align_corners=False)
        out.append((big.to(device), small.to(device), torch.randint(0, CLASSES, (batch,), generator=g).to(device)))
    return out


def loss_curve(device, teacher, student0, data, targets, precision: str) -> list[float]:
    from clipcore.distill_loss import DistillLoss, LossConfig

    model = Trainable(copy.deepcopy(student0)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # 2**10, not the default 2**16: the default overflows on the first steps and skips them while it
    # calibrates, which on a short curve leaves fp16 with fewer updates than fp32
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10) if precision == "fp16" else None
    loss_fn = DistillLoss(LossConfig(kl_weight=1.0, clip_weight=1.0, feature_weight=1.0))
    curve = []
    for (_, small, labels), target in zip(data, targets):
        opt.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = distill_step(model, teacher, loss_fn, small, target, labels)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        curve.append(float(loss.detach()))
    return curve


def correctness(runner: Runner, device, teacher: Teacher, s: Settings, tok_dir: Path) -> None:
    name, size = CORRECTNESS_STUDENT
    size = s.size(size)
    student0 = build_image_student(name, size, teacher.dim, device, tok_dir)
    # one batch, fitted step after step: a smooth, deterministic curve (fresh random batches with
    # random labels make it so noisy that any rounding difference looks like a departure)
    data = batches(1, s.corr_batch, teacher_input_size(teacher), size, device, seed=1) * s.corr_steps
    targets = [teacher.image_emb(data[0][0])] * s.corr_steps
    curves: dict[str, list[float]] = {}

    def run(precision: str) -> dict[str, Any]:
        check_precision(device, precision)
        curve = loss_curve(device, teacher, student0, data, targets, precision)
        curves[precision] = curve
        metrics: dict[str, Any] = {"first_loss": curve[0], "last_loss": curve[-1], "steps": len(curve)}
        if precision != "fp32" and "fp32" in curves:
            ref = curves["fp32"]
            metrics["max_rel_diff_vs_fp32"] = max(abs(a - b) / max(abs(b), 1e-8) for a, b in zip(curve, ref))
            metrics["tolerance"] = LOSS_TOLERANCE[precision]
            metrics["drop_vs_fp32_drop"] = (curve[0] - curve[-1]) / (ref[0] - ref[-1]) if ref[0] != ref[-1] else 1.0
        return metrics

    def ok(metrics: dict[str, Any]) -> str | None:
        if not all(math.isfinite(v) for v in (metrics["first_loss"], metrics["last_loss"])):
            return "loss is not finite"
        if "max_rel_diff_vs_fp32" in metrics and metrics["max_rel_diff_vs_fp32"] > metrics["tolerance"]:
            return f"loss curve departs from fp32 by {metrics['max_rel_diff_vs_fp32']:.3g} > {metrics['tolerance']}"
        if metrics.get("drop_vs_fp32_drop", 1.0) < MIN_DROP_RATIO:
            return f"loss fell {metrics['drop_vs_fp32_drop']:.2f} x as much as in fp32 (< {MIN_DROP_RATIO})"
        return None

    for precision in ("fp32", "bf16", "fp16"):
        label = f"{name} {size}px {precision}" + (" + GradScaler" if precision == "fp16" else "")
        runner.run("correctness", label, lambda p=precision: run(p), ok)


def teacher_input_size(teacher: Teacher) -> int:
    return int(teacher.model.config.vision_config.image_size)


def train_speed(device, teacher: Teacher, name: str, size: int, precision: str, online: bool, s: Settings,
                tok_dir: Path, pool: dict) -> dict[str, Any]:
    from clipcore.distill_loss import DistillLoss, LossConfig

    check_precision(device, precision)
    key = (s.speed_batch, size)
    if key not in pool:  # one set of batches per input size, reused by every run
        pool[key] = batches(s.warmup + s.speed_steps, s.speed_batch, teacher_input_size(teacher), size, device)
    data = pool[key]
    cached = [teacher.image_emb(big) for big, _, _ in data] if not online else None
    base = allocated(device)  # the input batches and cached targets are not the run's memory
    reset_peak(device)
    model = Trainable(build_image_student(name, size, teacher.dim, device, tok_dir)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = DistillLoss(LossConfig(kl_weight=1.0, clip_weight=1.0, feature_weight=1.0))
    start = 0.0
    for i, (big, small, labels) in enumerate(data):
        if i == s.warmup:
            synchronize(device)
            start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast(device, precision):
            target = teacher.image_emb(big) if online else cached[i]
            loss = distill_step(model, teacher, loss_fn, small, target.float(), labels)
        loss.backward()
        opt.step()
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"images_per_s": s.speed_steps * s.speed_batch / seconds, "batch": s.speed_batch,
            "peak_mem_mb": peak_mb(device, base)}


def speed_checks(runner: Runner, device, teacher: Teacher, s: Settings, tok_dir: Path) -> None:
    pool: dict = {}
    for name, size in SPEED_STUDENTS:
        for precision in ("bf16", "fp32"):
            for online in (False, True):
                label = f"{name} {s.size(size)}px {precision} teacher {'online' if online else 'cached'}"
                runner.run("speed", label, lambda n=name, z=s.size(size), p=precision, o=online:
                           train_speed(device, teacher, n, z, p, o, s, tok_dir, pool))
    pool.clear()
    runner.run("speed", f"teacher inference bf16, batch {s.teacher_batch}",
               lambda: teacher_inference(device, teacher, s))


def teacher_inference(device, teacher: Teacher, s: Settings) -> dict[str, Any]:
    check_precision(device, "bf16")
    model = copy.deepcopy(teacher.model).to(torch.bfloat16)
    size = teacher_input_size(teacher)
    x = torch.randn(s.teacher_batch, 3, size, size, device=device, dtype=torch.bfloat16)
    from clipcore import compat

    reset_peak(device)
    with torch.no_grad():
        for _ in range(s.warmup):
            compat.image_features(model, x)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(s.teacher_iters):
            compat.image_features(model, x)
        synchronize(device)
    seconds = time.perf_counter() - start
    return {"images_per_s": s.teacher_iters * s.teacher_batch / seconds, "batch": s.teacher_batch,
            "peak_mem_mb": peak_mb(device)}


# ---------------------------------------------------------------------------------- distributed


def _dist_worker(rank: int, world: int, init_file: str, backend: str, local_batch: int, out: str) -> None:
    """One rank: CLIP loss of its rows against the gathered batch; writes loss and summed grads."""
    import torch.distributed as dist

    from clipcore.losses import ClipLoss  # gathers through clipcore.dist.gather_with_grad

    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        layer, x_img, x_txt, log_scale = _dist_problem(world * local_batch, device)
        rows = slice(rank * local_batch, (rank + 1) * local_batch)
        loss = ClipLoss(1.0)(student_image=layer(x_img[rows]), student_text=layer(x_txt[rows]),
                             student_log_scale=log_scale)["clip_loss"]
        loss.backward()
        values = torch.cat([loss.detach().reshape(1), layer.weight.grad.reshape(-1)])
        dist.all_reduce(values)  # sum of local losses and of raw gradients over ranks
        if rank == 0:
            Path(out).write_text(json.dumps(values.cpu().tolist()))
        dist.barrier()  # no rank tears the group down while another still talks to it
    finally:
        dist.destroy_process_group()
    # Skip the interpreter's teardown: gloo's threads have aborted a worker there after its work was
    # done ("terminate called without an active exception", SIGABRT; seen once in CI on 2 CPU cores).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _dist_problem(batch: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(16, 8, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(8, 16, generator=g))
    x_img, x_txt = torch.randn(batch, 16, generator=g), torch.randn(batch, 16, generator=g)
    log_scale = torch.tensor(math.log(1 / 0.07))
    return layer.to(device), x_img.to(device), x_txt.to(device), log_scale.to(device)


def distributed_parity(device: torch.device, s: Settings) -> dict[str, Any]:
    import torch.distributed as dist
    import torch.multiprocessing as mp

    from clipcore.losses import ClipLoss

    world = 2
    if device.type == "cuda":
        if torch.cuda.device_count() < world:
            raise Skipped(f"needs >= {world} GPUs, this machine has {torch.cuda.device_count()}")
        if not dist.is_nccl_available():
            raise Skipped("this torch build has no NCCL")
        backend = "nccl"
    else:
        backend = "gloo"
    summed, retried = None, None
    for attempt in range(2):  # one retry, reported: a worker killed by a signal says nothing about parity
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rank0.json"
            try:
                mp.spawn(_dist_worker, args=(world, str(Path(tmp) / "init"), backend, s.dist_batch, str(out)),
                         nprocs=world)
            except mp.ProcessExitedException as exc:
                if attempt or exc.signal_name is None:
                    raise
                retried = str(exc)
                continue
            summed = torch.tensor(json.loads(out.read_text()))
            break
    ref_device = torch.device("cuda:0") if backend == "nccl" else device
    layer, x_img, x_txt, log_scale = _dist_problem(world * s.dist_batch, ref_device)
    ref = ClipLoss(1.0)(student_image=layer(x_img), student_text=layer(x_txt), student_log_scale=log_scale)["clip_loss"]
    ref.backward()
    # mean of the ranks' local losses is the global loss; the summed raw gradients are world x its gradient
    loss_diff = abs(float(summed[0]) / world - float(ref.detach()))
    grad_diff = float((summed[1:] / world - layer.weight.grad.reshape(-1).cpu()).abs().max())
    result = {"backend": backend, "processes": world, "global_loss": float(ref.detach()), "loss_abs_diff": loss_diff,
              "grad_max_abs_diff": grad_diff}
    return result | ({"retried_after": retried} if retried else {})


# --------------------------------------------------------------------------------------- export


def export_checks(runner: Runner, device, teacher: Teacher, s: Settings, tok_dir: Path, out_dir: Path) -> None:
    import numpy as np

    name, size = EXPORT_STUDENT
    size = s.size(size)
    student = build_image_student(name, size, teacher.dim, torch.device("cpu"), tok_dir).eval()
    onnx_path = out_dir / f"{name}.image_encoder.onnx"
    state: dict[str, Any] = {}
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(s.export_batch, 3, size, size, generator=g)

    def timed(fn) -> tuple[Any, float]:
        result = fn()  # warm-up (and TensorRT / cuDNN autotuning)
        start = time.perf_counter()
        for _ in range(s.export_iters):
            result = fn()
        return result, s.export_iters * s.export_batch / (time.perf_counter() - start)

    def torch_row(precision: str) -> dict[str, Any]:
        check_precision(device, precision)
        model = copy.deepcopy(student).to(device)
        x = pixels.to(device)

        def fn():
            with torch.no_grad(), autocast(device, precision):
                y = model.encode_image(x)
            synchronize(device)
            return y.float().cpu().numpy()

        emb, ips = timed(fn)
        if precision == "fp32":
            state["reference"] = emb
        return {"images_per_s": ips, "batch": s.export_batch, **_diff(state, emb)}

    def export_row() -> dict[str, Any]:
        try:
            from exports.onnx_export import export_image_encoder
        except ImportError as exc:  # onnx (or onnxruntime) is not installed
            raise Skipped(f"the ONNX exporter cannot be imported ({exc})") from exc
        start = time.perf_counter()
        export_image_encoder(student, onnx_path)
        return {"export_s": time.perf_counter() - start, "size_mb": onnx_path.stat().st_size / 2**20}

    def ort_row(variant: str) -> dict[str, Any]:
        if not onnx_path.is_file():
            raise Skipped("no ONNX graph (see the export row)")
        from exports.interface import IMAGE_ENCODER
        from exports.providers import CPU_EP, TensorRTEngine, detect, open_ort_session
        from exports.runtime import OnnxGraph

        feeds = pixels.numpy()
        if variant == "ort-cpu-fp32":
            graph = OnnxGraph(onnx_path, IMAGE_ENCODER, providers=[CPU_EP])
        else:
            reason = detect().skip_reason(variant)
            if reason:
                raise Skipped(reason)
            if variant == "trt-fp16":
                graph = TensorRTEngine(onnx_path, input_shape=(3, size, size), max_batch=s.export_batch)
            else:
                graph = open_ort_session(variant, onnx_path, input_shape=(3, size, size), max_batch=s.export_batch,
                                         cache_dir=out_dir / "trt-cache")
        run = (lambda: graph.embed(feeds)) if variant == "trt-fp16" else (
            lambda: graph.run({IMAGE_ENCODER.inputs[0].name: feeds})[IMAGE_ENCODER.outputs[0].name])
        emb, ips = timed(run)
        return {"images_per_s": ips, "batch": s.export_batch, **_diff(state, np.asarray(emb))}

    runner.run("export", f"torch {device.type} fp32 ({name} {size}px)", lambda: torch_row("fp32"))
    runner.run("export", f"torch {device.type} bf16 autocast", lambda: torch_row("bf16"))
    runner.run("export", "ONNX export (torch exporter)", export_row)
    for variant in ("ort-cpu-fp32", "ort-cuda-fp32", "ort-trt-fp16", "trt-fp16"):
        runner.run("export", variant, lambda v=variant: ort_row(v))


def _diff(state: dict, emb) -> dict[str, Any]:
    import numpy as np

    ref = state.get("reference")
    if ref is None:
        return {}
    return {"max_abs_diff_vs_torch_fp32": float(np.abs(np.asarray(emb, dtype=np.float32) - ref).max())}


# ----------------------------------------------------------------------------------------- main


def write_reports(out: Path, env: dict, rows: list[Row], elapsed: float, settings: Settings) -> None:
    failed = [r for r in rows if r.status == "failed"]
    report = {"environment": env, "settings": asdict(settings), "elapsed_s": elapsed, "passed": not failed,
              "rows": [asdict(r) for r in rows]}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    lines = ["# GPU check", "", f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {elapsed:.0f} s; "
             + ", ".join(f"{k} {v}" for k, v in env.items()), "",
             f"Correctness: max relative departure from the fp32 loss curve {LOSS_TOLERANCE}; the loss must "
             f"fall by >= {MIN_DROP_RATIO} x the fp32 fall.", "",
             "| section | check | status | numbers |", "|---|---|---|---|", *(r.line() for r in rows), ""]
    (out / "gpu_check.md").write_text("\n".join(lines))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    # a fixed prog: under `clip-distill gpu-check` the default (sys.argv[0]) would name the wrong command
    p = argparse.ArgumentParser(prog="python benchmarks/gpu_check.py", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for gpu_check.json and gpu_check.md")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes: every code path in under a minute on a CPU")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip the checks left after this many seconds (default 420; none with --quick, "
                        "which must run every code path)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (for a rerun of what failed)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {args.device}: torch {torch.__version__} sees no CUDA device; use --device cpu",
              file=sys.stderr)
        return 2
    settings = Settings.quick() if args.quick else Settings()
    if args.quick and device.type == "cpu":
        # a check of code paths, not of speed: one thread (also in the spawned workers) keeps a busy
        # shared CPU from stalling in OpenMP spin-waits (5x slower on 2 loaded cores, measured)
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    budget = args.budget_s if args.budget_s is not None else (math.inf if args.quick else 420.0)
    sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        print(f"error: --sections: unknown {unknown}; expected a subset of {list(SECTIONS)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    runner = Runner(budget)
    env = environment(device, settings)

    from clipcore import compat
    from clipcore.testing import write_byte_tokenizer

    with tempfile.TemporaryDirectory() as tmp, compat.quiet_progress():
        tok_dir = Path(tmp) / "tokenizer"
        write_byte_tokenizer(tok_dir, max_length=77)  # CLIP students' text side; only images train here
        teacher = build_teacher(device, settings.tiny_teacher)
        if "correctness" in sections:
            correctness(runner, device, teacher, settings, tok_dir)
        if "distributed" in sections:
            runner.run("distributed", "all-gather CLIP loss parity, 2 processes",
                       lambda: distributed_parity(device, settings),
                       lambda m: None if m["loss_abs_diff"] < 1e-4 and m["grad_max_abs_diff"] < 1e-4
                       else "loss or gradient differs from one process on the whole batch (tolerance 1e-4)")
        if "speed" in sections:
            speed_checks(runner, device, teacher, settings, tok_dir)
        if "export" in sections:
            export_checks(runner, device, teacher, settings, tok_dir, Path(tmp))
    elapsed = time.perf_counter() - start
    write_reports(out, env, runner.rows, elapsed, settings)
    print((out / "gpu_check.md").read_text())
    return 1 if any(r.status == "failed" for r in runner.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
