"""The step after training: export the student, check every variant's parity, write an edge bundle.

``distill/train.py`` calls :func:`export_and_check` when the recipe has ``export.enabled: true``.
Outputs, under ``<output_dir>/export``:

    onnx/                  the student's ONNX graphs that passed their gates (rejected ones are deleted)
    parity.json|md|html    the parity report (see ``python -m exports.parity``)
    bundle-<precision>/    the torch-free edge bundle (``python -m exports.predict``), when that
                           precision passed its gate: assembled from the gated file and class head
                           themselves, with the report as its certificate (exports.gated_bundle)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from clipcore.data import DataSpec
from clipcore.dual_encoder import DualEncoder
from exports.gated_bundle import bundle_from_parity
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
                     gates: Mapping[str, Mapping[str, float | None]] | None = None,
                     calibration: DataSpec | None = None, calibration_limit: int = 128,
                     bundle_text: bool = False) -> ExportResult:
    """Parity of every variant against the teacher and the torch student; bundle a kept precision.

    Args:
        calibration: the data (path and split) whose seeded random subset of ``calibration_limit``
            images calibrates static int8 (the trainer passes its training split); default the
            evaluation data's ``train`` split.
        bundle_text: gate the text encoder too and ship it in the bundle (open vocabulary): the
            int8 one when it passed its gate, else the fp32 one.
    """
    out_dir = Path(out_dir)
    cal = {} if calibration is None else {"calibration_data": calibration.path,
                                          "calibration_split": calibration.split or "train",
                                          "calibration_seed": calibration.shuffle_seed or 0}
    settings = ParitySettings(templates=templates, classnames=classnames, calibration_limit=calibration_limit,
                              text_encoder=bundle_text, **cal)
    report = run_parity(teacher, student, data, out_dir, variants=variants, settings=settings,
                        gates=load_gates(gates))
    paths = report.write(out_dir)
    bundle = None
    if bundle_precision:
        row = next((r for r in report.subjects if r.name == bundle_precision), None)
        if row is not None and row.status == "kept":
            text = _text_variant(report) if bundle_text else None
            if bundle_text and text is None:
                log.warning("no text encoder in the bundle: neither text-int8 nor text-fp32 passed its gate")
            bundle = bundle_from_parity(out_dir, bundle_precision, out_dir / f"bundle-{bundle_precision}",
                                        text_variant=text, overwrite=True)
        else:
            log.warning("no %s bundle: that variant was %s", bundle_precision, row.status if row else "not built")
    return ExportResult(report.passed, paths, bundle, summary_table(report))


def _text_variant(report) -> str | None:
    kept = {r.name for r in report.subjects if r.status == "kept"}
    return next((name for name in ("text-int8", "text-fp32") if name in kept), None)
