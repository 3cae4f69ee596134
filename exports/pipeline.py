"""The step after training: export the student, check every variant's parity, write an edge bundle.

``distill/train.py`` calls :func:`export_and_check` when the recipe has ``export.enabled: true``.
Outputs, under ``<output_dir>/export``:

    onnx/                  the student's ONNX graphs that passed their gates (rejected ones are deleted)
    parity.json|md|html    the parity report (see ``python -m exports.parity``)
    bundle-<precision>/    the torch-free edge bundle (``python -m exports.predict``), when every
                           gate passed: assembled from the gated file and class head themselves,
                           with the report as its certificate (exports.gated_bundle)

The whole directory is built beside it (``.tmp-export``) and renamed into place, replacing the
previous export whole: a report never sits next to an earlier run's bundle, and a failed gate
leaves no bundle at all.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from clipcore.data import DataSpec
from clipcore.dual_encoder import DualEncoder
from exports.gated_bundle import bundle_from_parity
from exports.parity import ParitySettings, load_gates, run_parity, summary_table
from exports.text_parity import shipped_text_variant

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
                     bundle_text: bool = False, reference: DualEncoder | None = None,
                     int8_float_layers: int = 0) -> ExportResult:
    """Parity of every variant against the teacher and the torch student; bundle a kept precision.

    Args:
        calibration: the data (path and split) whose seeded random subset of ``calibration_limit``
            images calibrates static int8 (the trainer passes its training split); default the
            evaluation data's ``train`` split.
        bundle_text: gate the text encoder too and ship it in the bundle (open vocabulary): the
            int8 one when it passed its gate, else the fp32 one.
        reference: the torch model the variants must agree with, if not ``student``
            (:func:`exports.parity.run_parity`).
        int8_float_layers: static int8 keeps the first this many weighted layers fp32 (a mixed graph).
    """
    out_dir = Path(out_dir)
    cal = {} if calibration is None else {"calibration_data": calibration.path,
                                          "calibration_split": calibration.split or "train",
                                          "calibration_seed": calibration.shuffle_seed or 0}
    settings = ParitySettings(templates=templates, classnames=classnames, calibration_limit=calibration_limit,
                              text_encoder=bundle_text, int8_float_layers=int8_float_layers, **cal)
    # Everything is built in a directory beside out_dir and renamed into place at the end: the
    # previous export (its report, ONNX files and bundle) never survives next to this one's
    staging = out_dir.parent / f".tmp-{out_dir.name}"
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed run: never read
    try:
        report = run_parity(teacher, student, data, staging, variants=variants, settings=settings,
                            gates=load_gates(gates), reference=reference)
        for row in report.subjects:  # the report names the files where they will be, not where they were built
            if row.path and Path(row.path).is_relative_to(staging):
                row.path = str(out_dir / Path(row.path).relative_to(staging))
        paths = report.write(staging)
        bundle = _bundle(report, staging, bundle_precision, bundle_text)
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    paths = {k: out_dir / p.name for k, p in paths.items()}
    return ExportResult(report.passed, paths, bundle and out_dir / bundle.name, summary_table(report))


def _bundle(report, parity_dir: Path, precision: str | None, text: bool) -> Path | None:
    """The gated bundle of ``precision``, only when every gate of the report passed."""
    if not precision:
        return None
    if not report.passed:
        log.warning("no %s bundle: the parity report failed (%s)", precision, "; ".join(report.failures()))
        return None
    row = next((r for r in report.subjects if r.name == precision), None)
    if row is None or row.status != "kept":
        log.warning("no %s bundle: that variant was %s", precision, row.status if row else "not built")
        return None
    text_variant = _text_variant(report) if text else None
    if text and text_variant is None:
        log.warning("no text encoder in the bundle: neither text-int8 nor text-fp32 passed its gate")
    return bundle_from_parity(parity_dir, precision, parity_dir / f"bundle-{precision}", text_variant=text_variant)


def _replace_dir(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; a previous ``target`` is moved aside first and deleted after."""
    old = target.parent / f".old-{target.name}"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _text_variant(report) -> str | None:
    """The text encoder the bundle ships: the one the report's whole-pipeline rows were gated with."""
    row = shipped_text_variant(report.subjects)
    return row.name if row is not None else None
