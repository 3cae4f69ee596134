"""Parity report: does every exported variant of a student still classify like the student?

    python -m exports.parity --teacher T --student S --data ../shared/data/cifar10 --split test --limit 1000

Subjects are the teacher (torch), the student (torch), the student's ONNX image encoder at every
precision of :data:`exports.precision.PRECISIONS` (onnxruntime, CPU), the GPU variants of
:mod:`exports.providers` where they can run, and any ONNX files given with ``--onnx NAME=PATH``.
Each runs the full zero-shot pipeline on a labelled evaluation set: class-name prompts -> class
embeddings -> image embeddings -> ``softmax(logit_scale * img @ classes.T)``.

Class embeddings: the teacher's for the teacher; the torch student's for the student; for the
exported variants those of the student's exported fp32 text encoder (onnxruntime), computed once,
or, for image-only students whose text side is the frozen teacher's, the teacher's.

Every variant is held to a :class:`Gate` (by its name, else by its precision family ``fp32``,
``fp16`` or ``int8``); it is ``kept`` when it passes and ``rejected`` (its file deleted unless
``keep_rejected``) when it does not. The CLI writes ``parity.json``, ``parity.md`` and a
self-contained ``parity.html`` and exits 1 when a gate fails, 2 on bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from clipcore.classnames import classnames_for
from clipcore.data import (
    DatasetUnavailableError,
    DataSpec,
    DataSpecError,
    ImageDataset,
    load_hf_dataset,
    make_loader,
    resolve_columns,
)
from clipcore.dual_encoder import DualEncoder, ModelNotFoundError
from clipcore.loading import load_teacher
from clipcore.templates import get_templates
from clipcore.zeroshot import build_classifier, validate_classnames
from exports import providers as prov
from exports.interface import IMAGE_ENCODER, TEXT_ENCODER
from exports.onnx_export import _eval_mode, export_image_encoder, export_text_encoder
from exports.precision import PRECISIONS, ArrayCalibrationReader, load_onnx_model, make_variant
from exports.report import format_metric, render_html, render_markdown, subjects_table
from exports.runtime import InvalidModelError, OnnxGraph, l2_normalize
from students import load_model

REPORT_FORMAT = "clip-distill-parity-report"
REPORT_VERSION = 1
DEFAULT_VARIANTS = (*PRECISIONS, *prov.ACCELERATED_VARIANTS)
_EPS = 1e-9  # gate comparisons: 0.95 - 0.94 must not count as a drop of more than 1 point


class ParityInputError(ValueError):
    """Bad input to the parity report (unknown variant, unusable data); the CLI exits 2."""


# ----------------------------------------------------------------------------- gates

# gate field -> (metric it bounds, comparison)
GATE_FIELDS = {
    "min_agreement": ("agreement_student", ">="),
    "max_emb_abs_diff": ("emb_max_abs_diff", "<="),
    "max_top1_drop": ("top1_drop", "<="),
    "min_emb_cosine": ("emb_cos_min", ">="),
    "max_kl": ("kl_student", "<="),
}


@dataclass(frozen=True)
class GateCheck:
    field: str
    metric: str
    op: str
    value: float | None
    threshold: float
    passed: bool

    def describe(self) -> str:
        """``agreement_student = 98.26 % < 99.00 % (gate min_agreement)``."""
        if self.value is None:
            return f"{self.metric} was not measured (gate {self.field} needs it)"
        bad = {">=": "<", "<=": ">"}[self.op] if not self.passed else self.op
        return (f"{self.metric} = {format_metric(self.metric, self.value)} {bad} "
                f"{format_metric(self.metric, self.threshold)} (gate {self.field})")


@dataclass(frozen=True)
class Gate:
    """Thresholds a variant must meet against the torch student; None leaves a metric unchecked.

    Fractions, not percentages: ``min_agreement=0.995`` is 99.5 % top-1 agreement and
    ``max_top1_drop=0.01`` one accuracy point.
    """

    min_agreement: float | None = None
    max_emb_abs_diff: float | None = None
    max_top1_drop: float | None = None
    min_emb_cosine: float | None = None
    max_kl: float | None = None

    def check(self, metrics: Mapping[str, float | None]) -> list[GateCheck]:
        checks = []
        for name, (metric, op) in GATE_FIELDS.items():
            threshold = getattr(self, name)
            if threshold is None:
                continue
            value = metrics.get(metric)
            ok = value is not None and (value >= threshold - _EPS if op == ">=" else value <= threshold + _EPS)
            checks.append(GateCheck(name, metric, op, value, float(threshold), bool(ok)))
        return checks

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}


DEFAULT_GATES: dict[str, Gate] = {
    "fp32": Gate(min_agreement=1.0, max_emb_abs_diff=1e-4),
    "fp16": Gate(min_agreement=0.995),
    "int8": Gate(min_agreement=0.99, max_top1_drop=0.01),
}


def gate_family(precision: str) -> str:
    """``fp32``, ``fp16`` or ``int8`` (both int8 schemes share a gate by default)."""
    return "int8" if precision.startswith("int8") else precision


def precision_from_name(name: str) -> str:
    """The precision an ``--onnx NAME=PATH`` file is reported and gated as: the one its name
    mentions (a bare ``int8`` counts as ``int8-dynamic``), else ``fp32``."""
    for precision in ("int8-static", "int8-dynamic", "fp16"):
        if precision in name:
            return precision
    return "int8-dynamic" if "int8" in name else "fp32"


def _gate_value(raw: Any, where: str) -> float | None:
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("none", "null", "off")):
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ParityInputError(f"{where}: {raw!r} is not a number (or 'none' to turn the check off)") from None
    if not math.isfinite(value) or value < 0:
        raise ParityInputError(f"{where}: {raw!r} must be a finite, non-negative number")
    return value


def _merge_gate(gates: dict[str, Gate], key: str, fields: Mapping[str, Any], where: str) -> None:
    unknown = set(fields) - set(GATE_FIELDS)
    if unknown:
        raise ParityInputError(f"{where}: unknown gate fields {sorted(unknown)}; expected {sorted(GATE_FIELDS)}")
    values = {name: _gate_value(raw, f"{where} {key}.{name}") for name, raw in fields.items()}
    gates[key] = replace(gates.get(key, Gate()), **values)


def load_gates(path: str | Path | None = None, overrides: Iterable[str] = ()) -> dict[str, Gate]:
    """:data:`DEFAULT_GATES`, updated from a YAML/JSON file and ``KEY.FIELD=VALUE`` overrides.

    A key is a variant name (``int8-static``, ``ort-trt-fp16``, an ``--onnx`` name) or a precision
    family (``fp32``, ``fp16``, ``int8``); the file maps keys to ``{field: value}``.

    Raises:
        ParityInputError: unreadable file, unknown field or a value that is not a number.
    """
    gates = dict(DEFAULT_GATES)
    if path is not None:
        for key, fields in _read_gate_file(Path(path)).items():
            if not isinstance(fields, Mapping):
                raise ParityInputError(f"{path}: gate {key!r} must map fields to values, got {fields!r}")
            _merge_gate(gates, str(key), fields, str(path))
    for item in overrides:
        key_field, sep, raw = item.partition("=")
        key, dot, name = key_field.rpartition(".")
        if not sep or not dot or not key:
            raise ParityInputError(f"--gate {item!r}: expected KEY.FIELD=VALUE, e.g. int8.min_agreement=0.98")
        _merge_gate(gates, key, {name: raw}, "--gate")
    return gates


def _read_gate_file(path: Path) -> dict:
    import yaml

    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ParityInputError(f"{path}: unreadable gates file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict):
        raise ParityInputError(f"{path}: a gates file maps variant names or fp32/fp16/int8 to thresholds")
    return data


def resolve_gate(gates: Mapping[str, Gate], name: str, precision: str) -> tuple[str, Gate] | None:
    """The gate for a variant: by its name, else by its precision family."""
    for key in (name, gate_family(precision)):
        if key in gates:
            return key, gates[key]
    return None


# ----------------------------------------------------------------------------- settings and results


@dataclass
class ParitySettings:
    """How to run the report (everything but the models, the data and the gates).

    Attributes:
        templates: prompt template set name or strings.
        classnames: ``--classnames`` source (JSON file, or comma-separated); default the ClassLabel names.
        batch_size: images per evaluation batch.
        warmup, iters: latency at batch 1: untimed runs, then timed runs (p50/p95 over these).
        throughput_batch, throughput_iters: throughput: timed runs at this batch size (after one warm-up).
        threads: torch and onnxruntime intra-op threads; None leaves their defaults (all cores).
        calibration_split, calibration_limit: images for ``int8-static`` (a seeded random subset);
            the evaluation split is used when the data has no such split.
        keep_rejected: keep the ONNX files of rejected variants.
    """

    templates: str | Sequence[str] = "openai_cifar"
    classnames: str | None = None
    batch_size: int = 64
    warmup: int = 3
    iters: int = 20
    throughput_batch: int = 32
    throughput_iters: int = 5
    threads: int | None = None
    calibration_split: str = "train"
    calibration_limit: int = 128
    keep_rejected: bool = False

    def __post_init__(self) -> None:
        counts = {"batch_size": self.batch_size, "iters": self.iters, "throughput_batch": self.throughput_batch,
                  "throughput_iters": self.throughput_iters, "calibration_limit": self.calibration_limit}
        bad = {k: v for k, v in counts.items() if v < 1} | ({"warmup": self.warmup} if self.warmup < 0 else {})
        if bad:
            raise ParityInputError(f"settings must be positive counts: {bad}")
        try:
            get_templates(self.templates)
        except (KeyError, ValueError) as exc:
            raise ParityInputError(f"templates {self.templates!r}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["templates"] = d["templates"] if isinstance(d["templates"], str) else list(d["templates"])
        return d


@dataclass
class SubjectResult:
    """One row of the report."""

    name: str
    runtime: str  # torch | onnxruntime-cpu | onnxruntime-cuda | onnxruntime-tensorrt | tensorrt
    precision: str
    role: str  # teacher | student | variant
    status: str  # reference | kept | rejected | skipped | error
    reason: str | None = None
    path: str | None = None
    size_bytes: int | None = None
    size_of: str | None = None
    params: int | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)
    latency: dict[str, float] = field(default_factory=dict)
    gate: str | None = None
    checks: list[GateCheck] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.status in ("rejected", "error")

    def failure_messages(self) -> list[str]:
        if self.status == "error":
            return [f"{self.name}: error: {self.reason}"]
        return [f"{self.name}: {c.describe()}" for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["size_mb"] = None if self.size_bytes is None else round(self.size_bytes / 2**20, 3)
        if self.status == "skipped":
            d["reason"] = f"skipped: {self.reason}"
        return d


@dataclass
class ParityReport:
    subjects: list[SubjectResult]
    gates: dict[str, Gate]
    teacher: dict[str, Any]
    student: dict[str, Any]
    data: dict[str, Any]
    environment: dict[str, Any]
    settings: dict[str, Any]
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def passed(self) -> bool:
        """No variant was rejected or failed to run (skipped ones do not count)."""
        return not any(s.failed for s in self.subjects)

    def failures(self) -> list[str]:
        return [m for s in self.subjects for m in s.failure_messages()]

    def subject(self, name: str) -> SubjectResult:
        found = next((s for s in self.subjects if s.name == name), None)
        if found is None:
            raise KeyError(f"no subject {name!r}; subjects: {[s.name for s in self.subjects]}")
        return found

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": REPORT_FORMAT,
            "version": REPORT_VERSION,
            "created": self.created,
            "passed": self.passed,
            "failures": self.failures(),
            "teacher": self.teacher,
            "student": self.student,
            "data": self.data,
            "environment": self.environment,
            "settings": self.settings,
            "gates": {k: g.to_dict() for k, g in self.gates.items()},
            "subjects": [s.to_dict() for s in self.subjects],
        }

    def to_json(self) -> str:
        return json.dumps(_finite(self.to_dict()), indent=2, ensure_ascii=False) + "\n"

    def to_markdown(self) -> str:
        return render_markdown(_finite(self.to_dict()))

    def to_html(self) -> str:
        return render_html(_finite(self.to_dict()))

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write ``parity.json``, ``parity.md`` and ``parity.html`` into ``out_dir``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {"json": out_dir / "parity.json", "markdown": out_dir / "parity.md", "html": out_dir / "parity.html"}
        paths["json"].write_text(self.to_json())
        paths["markdown"].write_text(self.to_markdown())
        paths["html"].write_text(self.to_html())
        return paths


def _finite(obj: Any) -> Any:
    """NaN/inf -> None, so the JSON is strict (browsers and jq reject NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- subjects


Embed = Callable[[np.ndarray], np.ndarray]


@dataclass
class Subject:
    """A model under test: pixels (N, 3, H, W) float32 -> image embeddings (N, D)."""

    name: str
    runtime: str
    precision: str
    role: str
    pixels: str  # which transform feeds it: "teacher" or "student"
    embed: Embed | None
    head: np.ndarray | None = None  # (C, D) unit class embeddings
    logit_scale: float = 1.0
    path: Path | None = None
    owns_file: bool = False  # an artifact this run wrote (deleted when rejected)
    size_bytes: int | None = None
    size_of: str | None = None
    params: int | None = None
    status: str = "pending"
    reason: str | None = None

    @property
    def active(self) -> bool:
        return self.status == "pending"


def torch_embed(model: DualEncoder) -> Embed:
    def embed(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model.encode_image(torch.from_numpy(pixels).to(model.device)).float().cpu().numpy()

    return embed


def ort_embed(graph: OnnxGraph) -> Embed:
    name, out = IMAGE_ENCODER.inputs[0].name, IMAGE_ENCODER.outputs[0].name
    return lambda pixels: graph.run({name: pixels}, [out])[out]


def image_parameters(model: DualEncoder) -> list[torch.nn.Parameter]:
    """The parameters ``encode_image`` uses: those of every module that runs in it.

    Found with forward hooks, so it works for any dual encoder (a CLIP vision tower plus its
    projection, a CNN plus its head) without knowing its attribute names.
    """
    ran: list[torch.nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, *_: ran.append(mod)) for m in model.modules()]
    try:
        h, w = model.image_transform.output_size
        with torch.inference_mode():
            model.encode_image(torch.zeros(1, 3, h, w, device=model.device))
    finally:
        for hook in hooks:
            hook.remove()
    unique = {id(p): p for m in ran for p in m.parameters(recurse=False)}
    return list(unique.values())


def torch_subject(model: DualEncoder, name: str, role: str, pixels: str, head: np.ndarray) -> Subject:
    params = image_parameters(model)
    return Subject(
        name=name, runtime="torch", precision="fp32", role=role, pixels=pixels, embed=torch_embed(model),
        head=head, logit_scale=float(model.logit_scale.detach().float().item()),
        size_bytes=sum(p.numel() * p.element_size() for p in params),
        size_of="image-tower parameters in memory", params=sum(p.numel() for p in params),
    )


def onnx_subject(name: str, precision: str, path: Path, student: Subject, head: np.ndarray, *,
                 owns_file: bool, threads: int | None, runtime: str = "onnxruntime-cpu", embed: Embed | None = None) -> Subject:
    """An exported image encoder; ``embed`` defaults to an onnxruntime CPU session on ``path``."""
    return Subject(
        name=name, runtime=runtime, precision=precision, role="variant", pixels="student",
        embed=embed or ort_embed(OnnxGraph(path, IMAGE_ENCODER, threads=threads)),
        head=head, logit_scale=student.logit_scale, path=path, owns_file=owns_file,
        size_bytes=path.stat().st_size, size_of="image_encoder .onnx file", params=student.params,
    )


def failed_subject(name: str, precision: str, status: str, reason: str, runtime: str) -> Subject:
    return Subject(name=name, runtime=runtime, precision=precision, role="variant", pixels="student",
                   embed=None, status=status, reason=reason)


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ----------------------------------------------------------------------------- data and class heads


@dataclass
class EvalData:
    dataset: ImageDataset
    classnames: list[str]
    spec: DataSpec
    calibration_source: str | None = None  # set once int8-static has read its calibration images


def load_eval_data(spec: DataSpec, transforms: Mapping[str, Any], classnames: str | None = None) -> EvalData:
    """The labelled evaluation set, decoded and preprocessed once per transform.

    Raises:
        DataSpecError: missing data, no label column, or labels without class names.
    """
    ds = load_hf_dataset(spec)
    cols = resolve_columns(ds, spec)
    if not cols.label:
        raise DataSpecError(f"{spec.label}: zero-shot parity needs a label column (columns: {ds.column_names})")
    try:
        names = classnames_for(ds, cols.label, classnames)
    except ValueError as exc:
        raise ParityInputError(f"class names for {spec.label}: {exc}") from exc
    if names is None:
        raise DataSpecError(f"{spec.label}: label column {cols.label!r} is not a ClassLabel; pass classnames")
    return EvalData(ImageDataset(ds, dict(transforms), columns=cols, name=spec.label), validate_classnames(names), spec)


def prompts_for(classnames: Sequence[str], templates: str | Sequence[str]) -> tuple[list[str], int]:
    temps = get_templates(templates)
    return [t.format(c) for c in classnames for t in temps], len(temps)


def onnx_class_head(text_encoder: OnnxGraph, model: DualEncoder, classnames: Sequence[str],
                    templates: str | Sequence[str], batch_size: int = 256) -> np.ndarray:
    """:func:`clipcore.zeroshot.build_classifier`'s recipe with an exported text encoder.

    Every prompt is embedded and normalised, averaged per class and renormalised; tokens come
    from ``model.tokenize``.
    """
    prompts, per_class = prompts_for(classnames, templates)
    chunks = []
    for i in range(0, len(prompts), batch_size):
        tokens = model.tokenize(prompts[i : i + batch_size])
        ids = tokens["input_ids"].numpy()
        mask = tokens["attention_mask"].numpy() if "attention_mask" in tokens else np.ones_like(ids)
        out = text_encoder.run({"input_ids": ids, "attention_mask": mask})
        chunks.append(out[TEXT_ENCODER.outputs[0].name])
    emb = l2_normalize(np.concatenate(chunks).astype(np.float64)).reshape(len(classnames), per_class, -1)
    return l2_normalize(emb.mean(axis=1)).astype(np.float32)


@dataclass
class Heads:
    teacher: np.ndarray
    student: np.ndarray
    exported: np.ndarray
    source: str  # where the exported variants' class embeddings come from
    exported_vs_torch: float  # max |exported - torch student head|


def build_heads(teacher: DualEncoder, student: DualEncoder, names: Sequence[str], settings: ParitySettings,
                onnx_dir: Path) -> Heads:
    """Class embeddings for the teacher, the torch student and the exported variants."""
    teacher_head = build_classifier(teacher, names, settings.templates).cpu().numpy()
    if not student.has_own_text_tower and student.teacher is teacher:
        return Heads(teacher_head, teacher_head, teacher_head, "teacher text tower (torch), shared", 0.0)
    student_head = build_classifier(student, names, settings.templates).cpu().numpy()
    if not student.has_own_text_tower:
        return Heads(teacher_head, student_head, student_head, "teacher text tower (torch), shared", 0.0)
    path = export_text_encoder(student, onnx_dir / "text_encoder.fp32.onnx")
    head = onnx_class_head(OnnxGraph(path, TEXT_ENCODER, threads=settings.threads), student, names, settings.templates)
    return Heads(teacher_head, student_head, head, "student text_encoder.fp32.onnx (onnxruntime)",
                 float(np.abs(head - student_head).max()))


# ----------------------------------------------------------------------------- variants


def calibration_reader(data: EvalData, transform: Any, settings: ParitySettings) -> tuple[ArrayCalibrationReader, str]:
    """Preprocessed calibration batches for ``int8-static`` (undecodable images dropped)."""
    spec = replace(data.spec, split=settings.calibration_split, limit=settings.calibration_limit, shuffle_seed=0)
    try:
        dataset = ImageDataset.from_spec(spec, {"student": transform})
        source = spec.label
    except DataSpecError:
        spec = replace(data.spec, limit=settings.calibration_limit, shuffle_seed=0)
        dataset = ImageDataset.from_spec(spec, {"student": transform})
        source = f"{spec.label} (the evaluation split: no {settings.calibration_split!r} split)"
    batches = [{IMAGE_ENCODER.inputs[0].name: b["pixel_values_student"].numpy()}
               for b in make_loader(dataset, batch_size=16) if len(b["index"])]
    if not batches:
        raise DataSpecError(f"{source}: no decodable calibration image for int8-static")
    return ArrayCalibrationReader(batches), source


def cpu_variant(name: str, fp32: Path, student: Subject, head: np.ndarray, onnx_dir: Path,
                calibration: Callable[[], ArrayCalibrationReader], threads: int | None) -> Subject:
    """Write and open one onnxruntime CPU variant; a failure becomes an ``error`` subject."""
    path = fp32 if name == "fp32" else onnx_dir / f"image_encoder.{name}.onnx"
    try:
        if name != "fp32":
            make_variant(fp32, path, name, calibration() if name == "int8-static" else None)
        return onnx_subject(name, name, path, student, head, owns_file=True, threads=threads)
    except Exception as exc:  # quantiser and converter errors are reported, not fatal
        return failed_subject(name, name, "error", _error_text(exc), "onnxruntime-cpu")


ACCELERATED_RUNTIME = {"ort-cuda-fp32": "onnxruntime-cuda", "ort-trt-fp16": "onnxruntime-tensorrt",
                       "trt-fp16": "tensorrt"}


def accelerated_variant(name: str, fp32: Path, student: Subject, head: np.ndarray, info: prov.ProviderInfo,
                        *, input_shape: tuple[int, ...], max_batch: int, cache_dir: Path,
                        threads: int | None) -> Subject:
    """A GPU variant, or a ``skipped`` subject saying why it cannot run here."""
    precision, runtime = prov.PRECISION_OF[name], ACCELERATED_RUNTIME[name]
    reason = info.skip_reason(name)
    if reason:
        return failed_subject(name, precision, "skipped", reason, runtime)
    try:  # untested here: needs a GPU with onnxruntime-gpu / tensorrt
        if name == "trt-fp16":
            embed = prov.TensorRTEngine(fp32, input_shape=input_shape, max_batch=max_batch).embed
        else:
            embed = ort_embed(prov.open_ort_session(name, fp32, input_shape=input_shape, max_batch=max_batch,
                                                    cache_dir=cache_dir, threads=threads))
    except prov.ProviderUnavailable as exc:
        return failed_subject(name, precision, "skipped", str(exc), runtime)
    except Exception as exc:
        return failed_subject(name, precision, "error", _error_text(exc), runtime)
    return onnx_subject(name, precision, fp32, student, head, owns_file=False, threads=threads,
                        runtime=runtime, embed=embed)


def check_variant_names(variants: Sequence[str]) -> list[str]:
    unknown = [v for v in variants if v not in DEFAULT_VARIANTS]
    if unknown:
        raise ParityInputError(f"unknown variants {unknown}; expected some of {list(DEFAULT_VARIANTS)}")
    if len(set(variants)) != len(variants):
        raise ParityInputError(f"variants listed twice: {list(variants)}")
    return list(variants)


def check_onnx_files(files: Mapping[str, str | Path], image_shape: tuple[int, int, int] | None = None,
                     embed_dim: int | None = None) -> dict[str, Path]:
    """Validate user-supplied image encoders before any heavy work.

    Args:
        image_shape, embed_dim: the student's (C, H, W) input and embedding size; a graph whose
            fixed dimensions disagree is refused here rather than failing on the first batch.

    Raises:
        FileNotFoundError, InvalidModelError: a file is missing, corrupt or not an image encoder.
        ParityInputError: a name clashes with a built-in subject, or the graph's shapes do not fit.
    """
    clash = [n for n in files if n in DEFAULT_VARIANTS or n in ("teacher", "student")]
    if clash:
        raise ParityInputError(f"--onnx names {clash} clash with built-in subjects; choose other names")
    checked = {}
    for name, path in files.items():
        load_onnx_model(path)
        graph = OnnxGraph(path, IMAGE_ENCODER)  # loadable, with the image encoder's input name
        _check_io_shapes(name, Path(path), graph, image_shape, embed_dim)
        checked[name] = Path(path)
    return checked


def _check_io_shapes(name: str, path: Path, graph: OnnxGraph, image_shape: tuple[int, int, int] | None,
                     embed_dim: int | None) -> None:
    """Compare the fixed (integer) dimensions of the graph with the student's; symbolic ones pass."""
    inputs = {i.name: i.shape for i in graph.session.get_inputs()}
    outputs = {o.name: o.shape for o in graph.session.get_outputs()}
    got_in = inputs[IMAGE_ENCODER.inputs[0].name]
    if image_shape is not None and not _dims_fit(got_in[1:], image_shape):
        raise ParityInputError(f"--onnx {name}={path}: input {IMAGE_ENCODER.inputs[0].name} has shape {got_in}; "
                               f"the student takes (batch, {', '.join(map(str, image_shape))})")
    out_name = IMAGE_ENCODER.outputs[0].name
    got_out = outputs.get(out_name, next(iter(outputs.values()), None))
    if embed_dim is not None and got_out is not None and not _dims_fit(got_out[-1:], (embed_dim,)):
        raise ParityInputError(f"--onnx {name}={path}: output has shape {got_out}; the student's embeddings "
                               f"are {embed_dim}-dimensional")


def _dims_fit(got: Sequence[Any], want: Sequence[int]) -> bool:
    return len(got) == len(want) and all(not isinstance(g, int) or g == w for g, w in zip(got, want))


# ----------------------------------------------------------------------------- measuring


def embed_dataset(data: EvalData, subjects: Sequence[Subject], batch_size: int) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
    """Run every active subject over the evaluation set in one pass (each image decoded once).

    Returns:
        labels (N,), ``{subject name: L2-normalised embeddings (N, D)}`` and the number of
        images that failed to decode (dropped for every subject alike).
    """
    labels, embs, failed = [], {s.name: [] for s in subjects}, 0
    for batch in make_loader(data.dataset, batch_size=batch_size):
        failed += int(batch["num_failed"])
        if not len(batch["index"]):
            continue
        labels.append(batch["label"].numpy())
        for s in subjects:
            if s.active:
                _embed_batch(s, batch[f"pixel_values_{s.pixels}"].numpy(), embs[s.name])
    if not labels:
        raise DataSpecError(f"{data.spec.label}: no image could be decoded ({failed} failed)")
    return np.concatenate(labels), {k: l2_normalize(np.concatenate(v).astype(np.float32))
                                    for k, v in embs.items() if v}, failed


def _embed_batch(subject: Subject, pixels: np.ndarray, out: list[np.ndarray]) -> None:
    if subject.role != "variant":  # the references must run; their errors are bugs
        out.append(subject.embed(pixels))
        return
    try:
        emb = np.asarray(subject.embed(pixels), dtype=np.float32)
    except Exception as exc:
        subject.status, subject.reason = "error", f"inference failed: {_error_text(exc)}"
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


def topk_accuracy(logp: np.ndarray, labels: np.ndarray, k: int) -> float:
    k = min(k, logp.shape[1])
    top = np.argsort(-logp, axis=1, kind="stable")[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def mean_kl(ref_logp: np.ndarray, logp: np.ndarray) -> float:
    """Mean over images of KL(reference || subject)."""
    return float((np.exp(ref_logp) * (ref_logp - logp)).sum(axis=1).mean())


@dataclass
class References:
    labels: np.ndarray
    teacher_logp: np.ndarray
    student_logp: np.ndarray
    student_emb: np.ndarray


def subject_metrics(logp: np.ndarray, emb: np.ndarray, ref: References, compare_emb: bool) -> dict[str, float | None]:
    """Accuracy, agreement, KL and (for the student's own space) embedding differences."""
    top1 = topk_accuracy(logp, ref.labels, 1)
    pred = logp.argmax(axis=1)
    metrics: dict[str, float | None] = {
        "top1": top1,
        "top5": topk_accuracy(logp, ref.labels, 5),
        "top1_drop": topk_accuracy(ref.student_logp, ref.labels, 1) - top1,
        "agreement_teacher": float((pred == ref.teacher_logp.argmax(axis=1)).mean()),
        "agreement_student": float((pred == ref.student_logp.argmax(axis=1)).mean()),
        "kl_teacher": mean_kl(ref.teacher_logp, logp),
        "kl_student": mean_kl(ref.student_logp, logp),
        "emb_cos_min": None, "emb_cos_mean": None, "emb_max_abs_diff": None,
    }
    if compare_emb and emb.shape == ref.student_emb.shape:
        cos = (emb.astype(np.float64) * ref.student_emb).sum(axis=1)
        metrics.update(emb_cos_min=float(cos.min()), emb_cos_mean=float(cos.mean()),
                       emb_max_abs_diff=float(np.abs(emb.astype(np.float64) - ref.student_emb).max()))
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


# ----------------------------------------------------------------------------- the report


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

    Returns:
        the :class:`ParityReport`; check ``.passed``.

    Raises:
        ParityInputError, DataSpecError, InvalidModelError, FileNotFoundError: bad input.
    """
    settings = settings or ParitySettings()
    gates = dict(DEFAULT_GATES if gates is None else gates)
    variants = check_variant_names(variants)
    extra = check_onnx_files(onnx_files or {}, (3, *student.image_transform.output_size), student.embed_dim)
    info = provider_info or prov.detect()
    data_set = load_eval_data(data, {"teacher": teacher.image_transform, "student": student.image_transform},
                              settings.classnames)
    with _threads(settings.threads), _eval_mode(teacher), _eval_mode(student):
        return _run(teacher, student, data_set, Path(out_dir), variants, gates, settings, extra, info)


def _run(teacher, student, data: EvalData, out_dir: Path, variants, gates, settings, extra, info) -> ParityReport:
    onnx_dir = out_dir / "onnx"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    heads = build_heads(teacher, student, data.classnames, settings, onnx_dir)
    subjects = [torch_subject(teacher, "teacher", "teacher", "teacher", heads.teacher),
                torch_subject(student, "student", "student", "student", heads.student)]
    subjects += build_variants(student, subjects[1], heads.exported, data, onnx_dir, variants, settings, extra, info)
    labels, embs, failed = embed_dataset(data, subjects, settings.batch_size)
    results = score(subjects, labels, embs, gates, settings,
                    {"teacher": teacher.image_transform.output_size, "student": student.image_transform.output_size})
    remove_rejected(subjects, results, settings.keep_rejected)
    return ParityReport(
        subjects=results, gates=gates,
        teacher={"name": teacher.name, "fingerprint": teacher.fingerprint(), "embed_dim": teacher.embed_dim},
        student={"name": student.name, "fingerprint": student.fingerprint(), "embed_dim": student.embed_dim,
                 "own_text_tower": student.has_own_text_tower, "variant_class_embeddings": heads.source,
                 "variant_head_max_abs_diff": heads.exported_vs_torch},
        data={"path": data.spec.path, "split": data.spec.split, "limit": data.spec.limit,
              "num_images": int(len(labels)), "num_failed": failed, "num_classes": len(data.classnames),
              "classnames": data.classnames, "templates": list(get_templates(settings.templates)),
              "calibration": data.calibration_source},
        environment={**environment(student.device), "providers": info.to_dict()},
        settings=settings.to_dict(),
    )


def build_variants(student: DualEncoder, reference: Subject, head: np.ndarray, data: EvalData, onnx_dir: Path,
                   variants: Sequence[str], settings: ParitySettings, extra: Mapping[str, Path],
                   info: prov.ProviderInfo) -> list[Subject]:
    """Export the fp32 image encoder and open every requested variant (skipped/error ones included)."""
    fp32 = export_image_encoder(student, onnx_dir / "image_encoder.fp32.onnx")
    shape = (3, *student.image_transform.output_size)
    max_batch = max(settings.batch_size, settings.throughput_batch)

    def calibration() -> ArrayCalibrationReader:
        reader, data.calibration_source = calibration_reader(data, student.image_transform, settings)
        return reader

    out = []
    for name in variants:
        if name in PRECISIONS:
            out.append(cpu_variant(name, fp32, reference, head, onnx_dir, calibration, settings.threads))
        else:
            out.append(accelerated_variant(name, fp32, reference, head, info, input_shape=shape, max_batch=max_batch,
                                           cache_dir=onnx_dir / "trt_cache", threads=settings.threads))
    for name, path in extra.items():
        out.append(onnx_subject(name, precision_from_name(name), path, reference, head, owns_file=False,
                                threads=settings.threads))
    return out


def score(subjects: Sequence[Subject], labels: np.ndarray, embs: Mapping[str, np.ndarray], gates: Mapping[str, Gate],
          settings: ParitySettings, image_hw: Mapping[str, tuple[int, int]]) -> list[SubjectResult]:
    """Metrics, latency and gate verdicts for every subject, in order.

    Args:
        image_hw: input (height, width) per transform key (``teacher``, ``student``).
    """
    logp = {s.name: zero_shot_logprobs(embs[s.name], s.head, s.logit_scale) for s in subjects if s.active}
    ref = References(labels, logp["teacher"], logp["student"], embs["student"])
    results = []
    for s in subjects:
        result = SubjectResult(s.name, s.runtime, s.precision, s.role, s.status, s.reason,
                               str(s.path) if s.path else None, s.size_bytes, s.size_of, s.params)
        if s.active:
            result.metrics = subject_metrics(logp[s.name], embs[s.name], ref, compare_emb=s.role != "teacher")
            result.status = "reference" if s.role != "variant" else "kept"
            time_subject(s, result, (3, *image_hw[s.pixels]), settings)
            apply_gate(result, gates)
        results.append(result)
    return results


def time_subject(subject: Subject, result: SubjectResult, image_shape: tuple[int, ...], settings: ParitySettings) -> None:
    if subject.role != "variant":
        result.latency = measure_latency(subject.embed, image_shape, settings)
        return
    try:  # e.g. out of GPU memory at the throughput batch
        result.latency = measure_latency(subject.embed, image_shape, settings)
    except Exception as exc:
        result.status, result.reason = "error", f"latency run failed: {_error_text(exc)}"


def apply_gate(result: SubjectResult, gates: Mapping[str, Gate]) -> None:
    if result.role != "variant" or result.status != "kept":
        return
    found = resolve_gate(gates, result.name, result.precision)
    if found is None:
        result.reason = f"no gate for {result.name!r} or {gate_family(result.precision)!r}: kept unchecked"
        return
    result.gate, gate = found
    result.checks = gate.check(result.metrics)
    if not all(c.passed for c in result.checks):
        result.status = "rejected"
        result.reason = "rejected: " + "; ".join(c.describe() for c in result.checks if not c.passed)


def remove_rejected(subjects: Sequence[Subject], results: Sequence[SubjectResult], keep: bool) -> None:
    """Delete the files of rejected variants this run wrote (the others may still need the fp32 graph)."""
    if keep:
        return
    needed = {s.path for s, r in zip(subjects, results) if r.status not in ("rejected", "error") and s.path}
    for s, r in zip(subjects, results):
        if r.status in ("rejected", "error") and s.owns_file and s.path and s.path not in needed and s.path.exists():
            s.path.unlink()
            r.path, r.reason = None, f"{r.reason} (file removed)"


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for the run (onnxruntime sessions get it per session)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- CLI


def cli_model(flag: str, path: str, loader: Callable[[], DualEncoder],
               markers: Sequence[str] = ("config.json",)) -> DualEncoder:
    """Run ``loader``; a model that loads but cannot serve as a dual encoder is bad input.

    A local path is checked first: a file, or a directory holding none of ``markers``, is
    refused in one line (transformers' own message for it lists every architecture it knows).

    transformers and the student loader report an unsupported architecture (a BERT directory,
    an unknown ``student.json`` kind, a teacher of another embedding size) as TypeError or
    ValueError; the CLI turns those into exit 2 with the flag and path, not a traceback.

    Raises:
        ModelNotFoundError: unchanged (its message already names the path).
        ParityInputError: any other loading error.
    """
    local = Path(path)
    if local.is_file() or (local.is_dir() and not any((local / m).is_file() for m in markers)):
        what = "is a file" if local.is_file() else f"has no {' or '.join(markers)}"
        raise ParityInputError(f"{flag} {path}: not a model directory ({what})")
    try:
        return loader()
    except ModelNotFoundError:
        raise
    except (TypeError, ValueError, KeyError, OSError) as exc:
        raise ParityInputError(f"{flag} {path}: not a usable CLIP-family model ({_error_text(exc)})") from exc


def _onnx_arg(item: str) -> tuple[str, str]:
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{item!r}: expected NAME=PATH")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m exports.parity", description=__doc__.split("\n\n")[0],
                                epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher: hub id or model directory")
    p.add_argument("--teacher-random-init", action="store_true", help="build the teacher from its config (random weights)")
    p.add_argument("--student", required=True, help="student directory (save_student) or a Hugging Face CLIP model")
    p.add_argument("--data", required=True, help="labelled dataset: parquet/imagefolder directory or hub id")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most N images")
    p.add_argument("--shuffle", action="store_true", help="with --limit: a seeded random subset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-column", default=None)
    p.add_argument("--label-column", default=None)
    p.add_argument("--classnames", default=None, help="JSON file or comma-separated names (default: ClassLabel names)")
    p.add_argument("--templates", default="openai_cifar", help="template set name or a '{}' template")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated subset of {','.join(DEFAULT_VARIANTS)} (default: all)")
    p.add_argument("--onnx", type=_onnx_arg, action="append", default=[], metavar="NAME=PATH",
                   help="also measure this image encoder (gated by the precision its name mentions, else fp32)")
    p.add_argument("--gates", default=None, help="YAML/JSON file: {fp32|fp16|int8|VARIANT: {field: value}}")
    p.add_argument("--gate", action="append", default=[], metavar="KEY.FIELD=VALUE",
                   help=f"override one threshold, e.g. int8.min_agreement=0.98; fields: {', '.join(GATE_FIELDS)}")
    p.add_argument("--calibration-split", default="train", help="int8-static calibration images (default: train)")
    p.add_argument("--calibration-limit", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3, help="untimed runs before the batch-1 latency runs")
    p.add_argument("--iters", type=int, default=20, help="timed batch-1 runs (p50/p95 over these)")
    p.add_argument("--throughput-batch", type=int, default=32)
    p.add_argument("--throughput-iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch and onnxruntime intra-op threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch models' device")
    p.add_argument("--out", default="outputs/parity", help="writes parity.{json,md,html} and onnx/ here")
    p.add_argument("--keep-rejected", action="store_true", help="keep the ONNX files of rejected variants")
    return p


def _epilog() -> str:
    gates = "\n".join(f"  {key:5} " + ", ".join(f"{k}={v:g}" for k, v in gate.to_dict().items())
                      for key, gate in DEFAULT_GATES.items())
    return (f"default gates (fractions; against the torch student):\n{gates}\n"
            "exit status: 0 every gate passed, 1 a gate failed or a variant could not run, 2 bad input\n"
            "GPU variants that cannot run here are reported as 'skipped: <reason>' and do not fail the run.")


def settings_from_args(args: argparse.Namespace) -> ParitySettings:
    return ParitySettings(
        templates=args.templates, classnames=args.classnames, batch_size=args.batch_size, warmup=args.warmup,
        iters=args.iters, throughput_batch=args.throughput_batch, throughput_iters=args.throughput_iters,
        threads=args.threads, calibration_split=args.calibration_split, calibration_limit=args.calibration_limit,
        keep_rejected=args.keep_rejected,
    )


# ParityInputError, DataSpecError and InvalidModelError are ValueErrors, but a bare ValueError
# from deep inside a run is a bug and keeps its traceback
BAD_INPUT = (ParityInputError, DataSpecError, DatasetUnavailableError, InvalidModelError, ModelNotFoundError,
             FileNotFoundError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 passed, 1 a gate failed, 2 bad input)."""
    args = build_parser().parse_args(argv)
    try:
        # everything cheap is validated before the models load
        gates = load_gates(args.gates, args.gate)
        variants = check_variant_names([v.strip() for v in args.variants.split(",") if v.strip()])
        settings = settings_from_args(args)
        spec = DataSpec(path=args.data, split=args.split, image_column=args.image_column,
                        label_column=args.label_column, limit=args.limit,
                        shuffle_seed=args.seed if args.shuffle else None)
        teacher = cli_model("--teacher", args.teacher, lambda: load_teacher(
            args.teacher, random_init=args.teacher_random_init, device=args.device))
        student = cli_model("--student", args.student, lambda: load_model(args.student, teacher=teacher, device=args.device),
                             markers=("student.json", "config.json"))
        report = run_parity(teacher, student, spec, args.out, variants=variants, gates=gates,
                            settings=settings, onnx_files=dict(args.onnx))
    except BAD_INPUT as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    paths = report.write(args.out)
    print(summary_table(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    for message in report.failures():
        print(f"gate failed: {message}", file=sys.stderr)
    return 0 if report.passed else 1


def summary_table(report: ParityReport) -> str:
    return subjects_table(_finite(report.to_dict()))


if __name__ == "__main__":
    sys.exit(main())
