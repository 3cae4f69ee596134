"""Orchestration: export, build the variants, measure every subject, apply the gates, write nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from clipcore.data import DataSpec
from clipcore.dual_encoder import DualEncoder
from clipcore.templates import get_templates
from exports import providers as prov
from exports.onnx_export import eval_mode
from exports.parity.eval_data import EvalData, build_heads, load_eval_data
from exports.parity.gates import DEFAULT_GATES, Gate, ParityInputError, gate_keys
from exports.parity.measure import (
    METRIC_NAMES,
    References,
    embed_dataset,
    environment,
    STUDENT_RELATIVE_METRICS,
    TEACHER_RELATIVE_METRICS,
    measure_latency,
    nonfinite_rows,
    subject_metrics,
    torch_threads,
    zero_shot_logprobs,
)
from exports.parity.results import ParityReport, ParitySettings, SubjectResult, apply_gate
from exports.parity.subjects import Subject, error_text, torch_subject
from exports.parity.names import DEFAULT_VARIANTS
from exports.parity.variants import build_variants, check_onnx_files, check_variant_names
from exports.runtime import sha256_file


def run_parity(
    teacher: DualEncoder,
    student: DualEncoder,
    data: DataSpec,
    out_dir: str | Path,
    *,
    variants: Sequence[str] = DEFAULT_VARIANTS,
    gates: Mapping[str, Gate] | None = None,
    settings: ParitySettings | None = None,
    onnx_files: Mapping[str, str | Path] | None = None,
    provider_info: prov.ProviderInfo | None = None,
    reference: DualEncoder | None = None,
) -> ParityReport:
    """Export ``student``, build its variants and measure them all against the torch models.

    Args:
        teacher, student: the dual encoders (used on their own devices, in eval mode during the run).
        data: a labelled evaluation set (``limit`` keeps it small).
        out_dir: ONNX files go to ``out_dir/onnx`` (rejected ones are deleted unless
            ``settings.keep_rejected``); nothing else is written (see :meth:`ParityReport.write`).
        variants: names from :data:`DEFAULT_VARIANTS`.
        gates: default :data:`DEFAULT_GATES` (see :func:`load_gates`).
        onnx_files: extra image encoders to measure, ``{name: path}``, gated by
            :func:`precision_from_name`; they are never deleted.
        provider_info: what can run here; default :func:`exports.providers.detect`.
        reference: the torch model whose predictions the variants must keep (the report's
            ``student`` row, which every ``agree student`` and student gate is measured against);
            default ``student`` itself. A QAT fine-tune towards its own fp32 outputs
            (``qat.target: self``) passes that fp32 student: its int8 file replaces it.

    Returns:
        the :class:`ParityReport`; check ``.passed``.

    Raises:
        ParityInputError, DataSpecError, InvalidModelError, FileNotFoundError: bad input.
    """
    settings = settings or ParitySettings()
    gates = dict(DEFAULT_GATES if gates is None else gates)
    variants = check_variant_names(variants)
    unknown = [k for k in gates if k not in gate_keys(onnx_files or {})]
    if unknown:
        raise ParityInputError(f"unknown gate keys {unknown}; expected some of {list(gate_keys(onnx_files or {}))}")
    extra = check_onnx_files(onnx_files or {}, (3, *student.image_transform.output_size), student.embed_dim)
    reference = check_reference(reference, student)
    info = provider_info or prov.detect()
    data_set = load_eval_data(data, {"teacher": teacher.image_transform, "student": student.image_transform},
                              settings.classnames, settings.templates)
    with torch_threads(settings.threads), eval_mode(teacher), eval_mode(student), eval_mode(reference):
        return _run(teacher, student, reference, data_set, Path(out_dir), variants, gates, settings, extra, info)


def check_reference(reference: DualEncoder | None, student: DualEncoder) -> DualEncoder:
    """``reference`` (default ``student``), refused unless it takes the student's pixels and embeds alike."""
    if reference is None or reference is student:
        return student
    if reference.embed_dim != student.embed_dim:
        raise ParityInputError(f"reference {reference.name} embeds into {reference.embed_dim} dimensions, "
                               f"the student {student.name} into {student.embed_dim}")
    if reference.image_transform.to_dict() != student.image_transform.to_dict():
        raise ParityInputError(f"reference {reference.name} preprocesses images unlike the student {student.name}: "
                               f"{reference.image_transform.to_dict()} vs {student.image_transform.to_dict()}")
    return reference


def _run(teacher, student, reference, data: EvalData, out_dir: Path, variants, gates, settings, extra,
         info) -> ParityReport:
    onnx_dir = out_dir / "onnx"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    heads = build_heads(teacher, student, data.classnames, settings, onnx_dir)
    subjects = [torch_subject(teacher, "teacher", "teacher", "teacher", heads.teacher),
                torch_subject(reference, "student", "student", "student", heads.student)]
    subjects += build_variants(student, subjects[1], heads.exported, data, onnx_dir, variants, settings, extra, info)
    labels, embs, failed = embed_dataset(data, subjects, settings.batch_size)
    results = score(subjects, labels, embs, gates, settings,
                    {"teacher": teacher.image_transform.output_size, "student": student.image_transform.output_size})
    remove_rejected(subjects, results, settings.keep_rejected)
    record_hashes(subjects, results)
    check_fp16_numerics(subjects, results)
    flips = what_flips(subjects, results, labels, embs, data, settings.max_flips)
    tokenizer = None
    if settings.text_encoder:
        from exports.text_parity import text_results

        text, tokenizer = text_results(student, data.classnames, subjects, labels, embs, gates, settings, onnx_dir,
                                       image_results=results)
        results += text
    return ParityReport(
        subjects=results, gates=gates,
        teacher={"name": teacher.name, "fingerprint": teacher.fingerprint(), "embed_dim": teacher.embed_dim},
        student={"name": student.name, "fingerprint": student.fingerprint(), "embed_dim": student.embed_dim,
                 "own_text_tower": student.has_own_text_tower, "variant_class_embeddings": heads.source,
                 "variant_head_max_abs_diff": heads.exported_vs_torch,
                 "variant_class_head": save_class_head(heads.exported, onnx_dir),
                 "logit_scale": subjects[1].logit_scale, "preprocess": student.image_transform.to_dict(),
                 "text_tokenizer": tokenizer,
                 "agreement_reference": None if reference is student else
                 {"name": reference.name, "fingerprint": reference.fingerprint()}},
        data={"path": data.spec.path, "split": data.spec.split, "limit": data.spec.limit,
              "num_images": int(len(labels)), "num_failed": failed, "num_classes": len(data.classnames),
              "classnames": data.classnames, "templates": list(get_templates(settings.templates)),
              "calibration": data.calibration_source},
        environment={**environment(student.device), "providers": info.to_dict()},
        settings=settings.to_dict(), flips=flips,
    )


def score(subjects: Sequence[Subject], labels: np.ndarray, embs: Mapping[str, np.ndarray], gates: Mapping[str, Gate],
          settings: ParitySettings, image_hw: Mapping[str, tuple[int, int]]) -> list[SubjectResult]:
    """Metrics, latency and gate verdicts for every subject, in order.

    Args:
        image_hw: input (height, width) per transform key (``teacher``, ``student``).
    """
    logp = {s.name: zero_shot_logprobs(embs[s.name], s.head, s.logit_scale) for s in subjects if s.active}
    nonfinite = {name: nonfinite_rows(embs[name], lp) for name, lp in logp.items()}
    ref = References(labels, logp["teacher"], logp["student"], embs["student"])
    results = []
    for s in subjects:
        result = SubjectResult(s.name, s.runtime, s.precision, s.role, s.status, s.reason,
                               str(s.path) if s.path else None, s.size_bytes, s.size_of, s.params)
        if s.active:
            result.metrics = (dict.fromkeys(METRIC_NAMES) if nonfinite[s.name] else
                              subject_metrics(logp[s.name], embs[s.name], ref, compare_emb=s.role != "teacher",
                                              student_finite=not nonfinite["student"],
                                              teacher_finite=not nonfinite["teacher"]))
            result.status = "reference" if s.role != "variant" else "kept"
            if nonfinite["teacher"] and s.role != "teacher" and not nonfinite[s.name]:
                result.reason = "; ".join(x for x in (result.reason, (
                    f"{', '.join(TEACHER_RELATIVE_METRICS)} not measured: the teacher has non-finite outputs "
                    f"({nonfinite['teacher']} of {len(labels)} images)")) if x)
            time_subject(s, result, (3, *image_hw[s.pixels]), settings)
            if not refuse_nonfinite(result, nonfinite[s.name], len(labels), nonfinite["student"]):
                apply_gate(result, gates)
        results.append(result)
    return results


def refuse_nonfinite(result: SubjectResult, bad: int, total: int, bad_student: int) -> bool:
    """Fail a subject with non-finite outputs, and every variant when the student (the reference of
    every gate) has them: NaN logits still have an argmax, so agreement alone would pass them."""
    what = f"non-finite outputs: {bad} of {total} images give NaN/inf embeddings or class probabilities"
    if bad:  # metrics of NaN logits are numbers that mean nothing (argmax of NaN is class 0)
        result.metrics = dict.fromkeys(result.metrics)
        result.status, result.reason = ("rejected", f"rejected: {what}") if result.role == "variant" else ("error", what)
    elif bad_student and result.role == "variant":
        result.metrics.update(dict.fromkeys(STUDENT_RELATIVE_METRICS))
        result.status = "rejected"
        result.reason = f"rejected: not gated: the torch student has non-finite outputs ({bad_student} of {total} images)"
    return result.status in ("error", "rejected")


def time_subject(subject: Subject, result: SubjectResult, image_shape: tuple[int, ...], settings: ParitySettings) -> None:
    if subject.role != "variant":
        result.latency = measure_latency(subject.embed, image_shape, settings)
        return
    try:  # e.g. out of GPU memory at the throughput batch
        result.latency = measure_latency(subject.embed, image_shape, settings)
    except Exception as exc:
        result.status, result.reason = "error", f"latency run failed: {error_text(exc)}"


def remove_rejected(subjects: Sequence[Subject], results: Sequence[SubjectResult], keep: bool) -> None:
    """Delete the files of rejected variants this run wrote (the others may still need the fp32 graph)."""
    if keep:
        return
    needed = {s.path for s, r in zip(subjects, results) if r.status not in ("rejected", "error") and s.path}
    for s, r in zip(subjects, results):
        if r.status in ("rejected", "error") and s.owns_file and s.path and s.path not in needed and s.path.exists():
            s.path.unlink()
            r.path, r.reason = None, f"{r.reason} (file removed)"


CLASS_HEAD_FILE = "text_embeddings.npy"  # the variants' class head, kept beside their ONNX files


def record_hashes(subjects: Sequence[Subject], results: Sequence[SubjectResult]) -> None:
    """sha256 of every variant file still on disk, so a bundle can prove it ships the gated bytes."""
    for s, r in zip(subjects, results):
        if r.role == "variant" and r.path and s.path and s.path.is_file():
            r.sha256 = sha256_file(s.path)


def save_class_head(head: np.ndarray, onnx_dir: Path) -> dict[str, str]:
    """Keep the head the variants were scored with (the file a bundle ships) and its sha256."""
    path = onnx_dir / CLASS_HEAD_FILE
    np.save(path, np.ascontiguousarray(head, dtype=np.float32), allow_pickle=False)
    return {"file": f"{onnx_dir.name}/{CLASS_HEAD_FILE}", "sha256": sha256_file(path)}


def check_fp16_numerics(subjects: Sequence[Subject], results: Sequence[SubjectResult]) -> None:
    """For every fp16 ONNX file: are LayerNorm, softmax and reductions still fp32? (a note per variant)"""
    from exports.fp16_check import describe, fp32_islands

    for s, r in zip(subjects, results):
        if r.precision == "fp16" and r.runtime == "onnxruntime-cpu" and s.path and s.path.is_file():
            r.fp16_numerics = fp32_islands(s.path)
            r.reason = "; ".join(x for x in (r.reason, describe(r.fp16_numerics)) if x)


def what_flips(subjects: Sequence[Subject], results: Sequence[SubjectResult], labels: np.ndarray,
               embs: Mapping[str, np.ndarray], data: EvalData, max_flips: int) -> dict:
    """:func:`exports.flips.analyse` over every measured image variant with finite outputs (none
    when the torch student, the reference of every flip, has non-finite outputs)."""
    from exports.flips import analyse

    student = subjects[1]
    finite = {name: bool(np.isfinite(e).all()) for name, e in embs.items()}
    if not finite.get("student", False):
        return {}
    variants = {s.name: (zero_shot_logprobs(embs[s.name], s.head, s.logit_scale), embs[s.name])
                for s, r in zip(subjects, results)
                if s.role == "variant" and s.name in embs and r.metrics and finite[s.name]}
    ds = data.dataset
    return analyse(variants, (zero_shot_logprobs(embs["student"], student.head, student.logit_scale), embs["student"]),
                   labels, data.rows, data.classnames, lambda row: ds.ds[int(row)][ds.columns.image], max_flips)
