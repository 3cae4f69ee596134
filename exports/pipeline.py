"""The step after training: export the student, check every variant's parity, write an edge bundle.

``distill/train.py`` calls :func:`export_and_check` when the recipe has ``export.enabled: true``.
Outputs, under ``<output_dir>/export``:

    onnx/                  the student's ONNX graphs that passed their gates (rejected ones are deleted)
    parity.json|md|html    the parity report (see ``python -m exports.parity``)
    bundle-<precision>/    the torch-free edge bundle (``python -m exports.predict``), when that
                           precision passed its gate
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from clipcore.data import DataSpec
from clipcore.dual_encoder import DualEncoder
from exports.bundle import write_bundle
from exports.parity import ParitySettings, load_gates, run_parity, summary_table

log = logging.getLogger("exports.pipeline")


@dataclass
class ExportResult:
    passed: bool
    report_paths: dict[str, Path]
    bundle: Path | None
    summary: str


def export_and_check(teacher: DualEncoder, student: DualEncoder, data: DataSpec, out_dir: str | Path, *,
                     variants: Sequence[str], templates: str, classnames: str | None = None,
                     bundle_precision: str | None = None,
                     gates: Mapping[str, Mapping[str, float | None]] | None = None) -> ExportResult:
    """Parity of every variant against the teacher and the torch student; bundle a kept precision."""
    out_dir = Path(out_dir)
    settings = ParitySettings(templates=templates, classnames=classnames)
    report = run_parity(teacher, student, data, out_dir, variants=variants, settings=settings,
                        gates=load_gates(gates))
    paths = report.write(out_dir)
    bundle = None
    if bundle_precision:
        row = next((r for r in report.subjects if r.name == bundle_precision), None)
        if row is not None and row.status == "kept":
            names = report.data["classnames"]
            bundle = write_bundle(student, names, templates, out_dir / f"bundle-{bundle_precision}",
                                  precision=bundle_precision, overwrite=True)
        else:
            log.warning("no %s bundle: that variant was %s", bundle_precision, row.status if row else "not built")
    return ExportResult(report.passed, paths, bundle, summary_table(report))
