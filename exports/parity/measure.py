"""Measuring: embeddings of the evaluation set, zero-shot metrics, latency and the environment."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from clipcore.data import DataSpecError, make_loader
from clipcore.metrics import topk_accuracy
from exports.onnx_export import compare_outputs
from exports.cpu_int8 import cpu_int8_dot
from exports.parity.eval_data import EvalData
from exports.parity.results import ParitySettings
from exports.parity.subjects import Embed, Subject, error_text
from exports.runtime import l2_normalize


def embed_dataset(data: EvalData, subjects: Sequence[Subject], batch_size: int) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
    """Run every active subject over the evaluation set in one pass (each image decoded once).

    Returns:
        labels (N,), ``{subject name: L2-normalised embeddings (N, D)}`` and the number of
        images that failed to decode (dropped for every subject alike).
    """
    labels, rows, embs, failed = [], [], {s.name: [] for s in subjects}, 0
    for batch in make_loader(data.dataset, batch_size=batch_size):
        failed += int(batch["num_failed"])
        if not len(batch["index"]):
            continue
        labels.append(batch["label"].numpy())
        rows.append(np.asarray(batch["index"]))
        for s in subjects:
            if s.active:
                _embed_batch(s, batch[f"pixel_values_{s.pixels}"].numpy(), embs[s.name])
    if not labels:
        raise DataSpecError(f"{data.spec.label}: no image could be decoded ({failed} failed)")
    data.rows = np.concatenate(rows)
    return np.concatenate(labels), {k: l2_normalize(np.concatenate(v).astype(np.float32))
                                    for k, v in embs.items() if v}, failed


def _embed_batch(subject: Subject, pixels: np.ndarray, out: list[np.ndarray]) -> None:
    if subject.role != "variant":  # the references must run; their errors are bugs
        out.append(subject.embed(pixels))
        return
    try:
        emb = np.asarray(subject.embed(pixels), dtype=np.float32)
    except Exception as exc:
        subject.status, subject.reason = "error", f"inference failed: {error_text(exc)}"
        return
    want = (len(pixels), subject.head.shape[1])
    if emb.shape != want:  # e.g. a graph with a symbolic embedding axis that holds another size
        subject.status, subject.reason = "error", f"output shape {emb.shape}; expected {want}"
        return
    out.append(emb)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def zero_shot_logprobs(emb: np.ndarray, head: np.ndarray, logit_scale: float) -> np.ndarray:
    """log softmax(logit_scale * emb @ head.T), in float64."""
    return log_softmax(logit_scale * emb.astype(np.float64) @ head.astype(np.float64).T)


def mean_kl(ref_logp: np.ndarray, logp: np.ndarray) -> float:
    """Mean over images of KL(reference || subject)."""
    return float((np.exp(ref_logp) * (ref_logp - logp)).sum(axis=1).mean())


def nonfinite_rows(emb: np.ndarray, logp: np.ndarray) -> int:
    """Images whose embedding or class log-probabilities hold a NaN or an infinity."""
    return int((~np.isfinite(emb).all(axis=1) | ~np.isfinite(logp).all(axis=1)).sum())


# metrics measured against the torch teacher / student: meaningless when that model's outputs are not finite
TEACHER_RELATIVE_METRICS = ("agreement_teacher", "kl_teacher")
STUDENT_RELATIVE_METRICS = ("top1_drop", "agreement_student", "kl_student", "emb_cos_min", "emb_cos_mean",
                            "emb_max_abs_diff")


@dataclass
class References:
    labels: np.ndarray
    teacher_logp: np.ndarray
    student_logp: np.ndarray
    student_emb: np.ndarray


METRIC_NAMES = ("top1", "top5", "top1_drop", "agreement_teacher", "agreement_student", "kl_teacher", "kl_student",
                "emb_cos_min", "emb_cos_mean", "emb_max_abs_diff")


def subject_metrics(logp: np.ndarray, emb: np.ndarray, ref: References, compare_emb: bool,
                    student_finite: bool = True, teacher_finite: bool = True) -> dict[str, float | None]:
    """Accuracy, agreement, KL and (for the student's own space) embedding differences.

    ``None`` for the metrics measured against the torch student (or teacher) when its outputs are
    not finite: the metrics refuse NaN inputs rather than return numbers that mean nothing (the
    argmax of NaN logits is class 0, so agreement with a NaN teacher could read 100 %).
    """
    labels = torch.from_numpy(ref.labels)
    top1 = topk_accuracy(torch.from_numpy(logp), labels, 1)
    pred = logp.argmax(axis=1)
    metrics: dict[str, float | None] = dict.fromkeys(METRIC_NAMES)
    metrics.update(top1=top1, top5=topk_accuracy(torch.from_numpy(logp), labels, 5))
    if teacher_finite:
        metrics.update(agreement_teacher=float((pred == ref.teacher_logp.argmax(axis=1)).mean()),
                       kl_teacher=mean_kl(ref.teacher_logp, logp))
    if not student_finite:
        return metrics
    metrics.update(top1_drop=topk_accuracy(torch.from_numpy(ref.student_logp), labels, 1) - top1,
                   agreement_student=float((pred == ref.student_logp.argmax(axis=1)).mean()),
                   kl_student=mean_kl(ref.student_logp, logp))
    if compare_emb and emb.shape == ref.student_emb.shape:
        diff = compare_outputs({"emb": ref.student_emb}, {"emb": emb})["emb"]
        metrics.update(emb_cos_min=diff.min_cosine, emb_cos_mean=diff.mean_cosine, emb_max_abs_diff=diff.max_abs_diff)
    return metrics


def measure_latency(embed: Embed, image_shape: tuple[int, ...], settings: ParitySettings, seed: int = 0) -> dict[str, float]:
    """Batch-1 latency percentiles and batch-``throughput_batch`` throughput, warm-up excluded.

    Timed end to end from numpy pixels to numpy embeddings (host-device copies included on a
    GPU), on random pixels: the cost of these networks does not depend on the values.
    """
    rng = np.random.default_rng(seed)
    one = rng.standard_normal((1, *image_shape), dtype=np.float32)
    for _ in range(settings.warmup):
        embed(one)
    times = []
    for _ in range(settings.iters):
        start = time.perf_counter()
        embed(one)
        times.append(time.perf_counter() - start)
    batch = rng.standard_normal((settings.throughput_batch, *image_shape), dtype=np.float32)
    embed(batch)  # first call at a new batch size can allocate or build kernels
    start = time.perf_counter()
    for _ in range(settings.throughput_iters):
        embed(batch)
    elapsed = time.perf_counter() - start
    return {
        "p50_ms": float(np.percentile(times, 50) * 1e3),
        "p95_ms": float(np.percentile(times, 95) * 1e3),
        "throughput_ips": settings.throughput_batch * settings.throughput_iters / max(elapsed, 1e-12),
    }


def environment(device: torch.device) -> dict[str, Any]:
    import onnxruntime

    info = {
        "device": str(device),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "cpu_int8_dot": cpu_int8_dot(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for the run (onnxruntime sessions get it per session)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
