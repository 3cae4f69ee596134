"""Parity of the text encoder an open-vocabulary bundle ships (``ParitySettings.text_encoder``).

Subjects ``text-fp32`` and ``text-int8``: the text tower (the student's, or the teacher's for
image-only students) exported to ONNX, run in onnxruntime on the ids of the device tokenizer
(``onnx/tokenizer.json``, the file the bundle ships). Each is measured and gated like an image
variant, by its name or precision family:

* ``emb_cos_min`` / ``emb_cos_mean`` / ``emb_max_abs_diff``: its prompt embeddings against the
  torch text tower's (with transformers' tokenizer), every class-name prompt of the report;
* accuracy, agreement and KL: the torch student's image embeddings classified with the head this
  text encoder builds from the class names, against the torch student's own head;
* latency: building the head for one class name (all templates), p50/p95 in ms; throughput in
  class names per second.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from clipcore.templates import get_templates
from exports.int8_scheme import resolve_precision
from exports.interface import TEXT_ENCODER
from exports.onnx_export import export_text_encoder
from exports.parity.names import TEXT_VARIANTS
from exports.precision import make_variant
from exports.runtime import OnnxGraph, sha256_file
from exports.text_bundle import save_device_tokenizer, text_model
from exports.text_runtime import TOKENIZER_FILE, DeviceTokenizer, build_head, prompts_for, text_embeddings


def torch_prompt_embeddings(model, prompts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    with torch.inference_mode():
        chunks = [model.encode_text(list(prompts[i : i + batch_size])).float().cpu().numpy()
                  for i in range(0, len(prompts), batch_size)]
    return np.concatenate(chunks).astype(np.float64)


def text_results(student, classnames: Sequence[str], subjects: Sequence[Any], labels: np.ndarray,
                 embs: Mapping[str, np.ndarray], gates: Mapping[str, Any], settings: Any,
                 onnx_dir: Path, image_results: Sequence[Any] = ()) -> tuple[list[Any], dict[str, Any]]:
    """The ``text-*`` subject results, the whole-pipeline rows of ``image_results``' kept variants
    (:func:`pipeline_results`), and the tokenizer record (``{file, sha256, source}``)."""
    from exports.parity.measure import References, zero_shot_logprobs
    from exports.parity.results import SubjectResult
    from exports.parity.results import apply_gate

    teacher_s, student_s = subjects[0], subjects[1]
    ref = References(labels, zero_shot_logprobs(embs["teacher"], teacher_s.head, teacher_s.logit_scale),
                     zero_shot_logprobs(embs["student"], student_s.head, student_s.logit_scale), embs["student"])
    model = text_model(student)
    tokenizer_path = save_device_tokenizer(model, onnx_dir / TOKENIZER_FILE)
    tokenizer = DeviceTokenizer(tokenizer_path)
    temps = list(get_templates(settings.templates))
    prompts = prompts_for(classnames, temps)
    reference = torch_prompt_embeddings(model, prompts)
    fp32 = export_text_encoder(model, onnx_dir / "text_encoder.fp32.onnx")
    params = sum(p.numel() for p in model.parameters())  # the whole dual encoder's: an upper bound
    results, heads = [], {}
    for name in TEXT_VARIANTS:
        precision = name.removeprefix("text-")
        scheme = resolve_precision(precision, fp32)
        path = fp32 if precision == "fp32" else onnx_dir / f"text_encoder.{precision}.onnx"
        result = SubjectResult(name, "onnxruntime-cpu", scheme, "variant", "kept",
                               f"text encoder of {model.name}; latency per class name ({len(temps)} prompts)",
                               str(path), size_of="text_encoder .onnx file", params=params)
        try:
            if path != fp32:
                make_variant(fp32, path, scheme)
            graph = OnnxGraph(path, TEXT_ENCODER, threads=settings.threads)
            result.metrics, heads[name] = text_metrics(graph, tokenizer, prompts, reference, classnames, temps, ref,
                                                       student_s.logit_scale)
            result.latency = text_latency(graph, tokenizer, classnames, temps, settings)
            result.size_bytes = path.stat().st_size
        except Exception as exc:  # a converter or runtime failure is this subject's error, not the run's
            result.status, result.reason = "error", f"{type(exc).__name__}: {str(exc).strip()[:400]}"
        apply_gate(result, gates)
        if result.status in ("rejected", "error") and path != fp32 and path.exists() and not settings.keep_rejected:
            path.unlink()
            result.path = None
        elif path.exists():
            result.sha256 = sha256_file(path)
        results.append(result)
    results += pipeline_results(image_results, results, heads, embs, ref, student_s.logit_scale, gates)
    return results, {"file": f"{onnx_dir.name}/{TOKENIZER_FILE}", "sha256": sha256_file(tokenizer_path),
                     "source": model.name}


def shipped_text_variant(text_results: Sequence[Any]) -> Any | None:
    """The text encoder a bundle ships: ``text-int8`` when kept, else ``text-fp32`` when kept."""
    kept = {r.name: r for r in text_results if r.status == "kept"}
    return kept.get("text-int8") or kept.get("text-fp32")


def pipeline_results(image_results: Sequence[Any], text_results: Sequence[Any], heads: Mapping[str, np.ndarray],
                     embs: Mapping[str, np.ndarray], ref: Any, logit_scale: float,
                     gates: Mapping[str, Any]) -> list[Any]:
    """One row per kept image variant: the whole zero-shot pipeline an open-vocabulary bundle runs.

    Its image encoder's embeddings classified with the head that the shipped text encoder builds
    from the class names (:func:`shipped_text_variant`), against the torch student's own
    probabilities: what each file's own row cannot show, their errors compounding. Named
    ``IMAGE+TEXT`` (``int8+text-int8``); gate key ``pipeline`` (as int8 by default), or the row's name.
    """
    from exports.parity.measure import subject_metrics, zero_shot_logprobs
    from exports.parity.results import SubjectResult, apply_gate

    text = shipped_text_variant(text_results)
    if text is None or text.name not in heads:
        return []
    rows = []
    for image in image_results:
        if image.role != "variant" or image.status != "kept" or image.name not in embs:
            continue
        row = SubjectResult(f"{image.name}+{text.name}", image.runtime, f"{image.precision}+{text.precision}",
                            "variant", "kept",
                            f"the whole pipeline: the {image.name} image encoder, class head from {text.name}",
                            size_of="image + text encoder files", params=None)
        if image.size_bytes is not None and text.size_bytes is not None:
            row.size_bytes = image.size_bytes + text.size_bytes
        logp = zero_shot_logprobs(embs[image.name], heads[text.name], logit_scale)
        row.metrics = subject_metrics(logp, embs[image.name], ref, compare_emb=True,
                                      teacher_finite=bool(np.isfinite(ref.teacher_logp).all()))
        apply_gate(row, gates)
        rows.append(row)
    return rows


def text_metrics(graph: OnnxGraph, tokenizer: DeviceTokenizer, prompts: Sequence[str], reference: np.ndarray,
                 classnames: Sequence[str], templates: Sequence[str], ref: Any,
                 logit_scale: float) -> tuple[dict[str, float | None], np.ndarray]:
    """The text subject's metrics, and the class head it builds (for the whole-pipeline rows)."""
    from exports.parity.measure import subject_metrics, zero_shot_logprobs
    from exports.runtime import l2_normalize

    emb = text_embeddings(graph, tokenizer, prompts).astype(np.float64)
    cos = (emb * reference).sum(axis=1)
    head = l2_normalize(emb.reshape(len(classnames), len(templates), -1).mean(axis=1))
    logp = zero_shot_logprobs(ref.student_emb, head, logit_scale)
    metrics = subject_metrics(logp, ref.student_emb, ref, compare_emb=False,
                              teacher_finite=bool(np.isfinite(ref.teacher_logp).all()))
    metrics.update(emb_cos_min=float(cos.min()), emb_cos_mean=float(cos.mean()),
                   emb_max_abs_diff=float(np.abs(emb - reference).max()))
    return metrics, head


def text_latency(graph: OnnxGraph, tokenizer: DeviceTokenizer, classnames: Sequence[str], templates: Sequence[str],
                 settings: Any) -> dict[str, float]:
    """Head building for one class name (tokenizer included), and class names per second over all."""
    one = [classnames[0]]
    for _ in range(settings.warmup):
        build_head(graph, tokenizer, one, templates)
    times = []
    for _ in range(settings.iters):
        start = time.perf_counter()
        build_head(graph, tokenizer, one, templates)
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    build_head(graph, tokenizer, classnames, templates)
    elapsed = time.perf_counter() - start
    return {"p50_ms": float(np.percentile(times, 50) * 1e3), "p95_ms": float(np.percentile(times, 95) * 1e3),
            "throughput_ips": len(classnames) / max(elapsed, 1e-12)}
