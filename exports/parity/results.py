"""The report model: settings, one result row per subject, the report and its files."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from clipcore.templates import get_templates
from exports.parity.gates import Gate, GateCheck, ParityInputError, gate_family, resolve_gate
from exports.report import render_html, render_markdown, subjects_table

REPORT_FORMAT = "clip-distill-parity-report"


REPORT_VERSION = 1


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
        calibration_data: where the calibration images come from (default: the evaluation data's
            path); the trainer passes its training set.
        calibration_seed: seed of the calibration subset.
        int8_float_layers: ``int8-static`` keeps the first this many weighted layers fp32 (a mixed graph,
            :func:`exports.precision.float_prefix_nodes`); 0: every layer int8.
        max_flips: per variant, at most this many flipped images (with thumbnails) in the report.
        text_encoder: also export, gate and time the text encoder an open-vocabulary bundle ships
            (subjects ``text-fp32``, ``text-int8``; see :mod:`exports.text_parity`).
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
    calibration_data: str | None = None
    calibration_seed: int = 0
    int8_float_layers: int = 0
    text_encoder: bool = False
    max_flips: int = 12
    keep_rejected: bool = False

    def __post_init__(self) -> None:
        counts = {"batch_size": self.batch_size, "iters": self.iters, "throughput_batch": self.throughput_batch,
                  "throughput_iters": self.throughput_iters, "calibration_limit": self.calibration_limit}
        bad = {k: v for k, v in counts.items() if v < 1} | {k: v for k, v in (("warmup", self.warmup),
                                                                            ("max_flips", self.max_flips),
                                                                            ("int8_float_layers",
                                                                             self.int8_float_layers)) if v < 0}
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
    sha256: str | None = None  # of the kept file: what a bundle built from this run must ship
    fp16_numerics: dict[str, Any] | None = None  # fp16 ONNX files: sensitive ops kept in fp32 (exports.fp16_check)

    @property
    def failed(self) -> bool:
        return self.status in ("rejected", "error")

    def failure_messages(self) -> list[str]:
        if self.status == "error":
            return [f"{self.name}: error: {self.reason}"]
        failed = [f"{self.name}: {c.describe()}" for c in self.checks if not c.passed]
        if self.status == "rejected" and not failed:  # rejected before any threshold was checked
            return [f"{self.name}: {self.reason}"]
        return failed

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
    flips: dict[str, Any] = field(default_factory=dict)  # exports.flips.analyse, per image variant
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
            "flips": self.flips,
        }

    def to_json(self) -> str:
        return json.dumps(finite(self.to_dict()), indent=2, ensure_ascii=False) + "\n"

    def to_markdown(self) -> str:
        return render_markdown(finite(self.to_dict()))

    def to_html(self) -> str:
        return render_html(finite(self.to_dict()))

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write ``parity.json``, ``parity.md`` and ``parity.html`` into ``out_dir``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {"json": out_dir / "parity.json", "markdown": out_dir / "parity.md", "html": out_dir / "parity.html"}
        # rendered before anything is written: never a parity.json without its .md and .html
        texts = {"json": self.to_json(), "markdown": self.to_markdown(), "html": self.to_html()}
        for key, path in paths.items():
            path.write_text(texts[key])
        return paths


def finite(obj: Any) -> Any:
    """NaN/inf -> None, so the JSON is strict (browsers and jq reject NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def summary_table(report: ParityReport) -> str:
    return subjects_table(finite(report.to_dict()))


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
        why = "rejected: " + "; ".join(c.describe() for c in result.checks if not c.passed)
        result.reason = why if not result.reason else f"{why} ({result.reason})"  # keep how it was made
