"""Bundles built from a parity run's own files: ship exactly what was gated, with its certificate.

:func:`exports.bundle.write_bundle` exports and quantises again, so what ships is probably, but
not provably, what the parity report measured. :func:`bundle_from_parity` instead copies the
kept ONNX file and the class head that the report scored, after checking their sha256 against
``parity.json``, and puts the certificate inside the bundle (under its manifest)::

    parity.json        the full report the variant passed
    certificate.json   its summary for this variant: data, gate checks with values, accuracies,
                       agreement, and the sha256 of the encoder, the head and parity.json

``python -m exports.predict BUNDLE --info`` prints the certificate. Needs no model and no torch:
only the parity output directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx

from exports.bundle import assemble_bundle, bundle_config, text_encoder_config
from exports.interface import TEXT_ENCODER
from exports.text_runtime import TOKENIZER_FILE
from exports.certificate import certificate_for
from exports.runtime import CERTIFICATE, PARITY_REPORT, sha256_file


class GatedBundleError(ValueError):
    """The parity run cannot certify a bundle (variant not kept, file changed since); names the file."""


def bundle_from_parity(parity_dir: str | Path, variant: str, out_dir: str | Path, *,
                       text_variant: str | None = None, overwrite: bool = False) -> Path:
    """Assemble a bundle of ``variant`` from the kept files of the parity run in ``parity_dir``.

    Args:
        parity_dir: where ``ParityReport.write`` wrote ``parity.json`` (with ``onnx/`` beside it).
        variant: a subject name of that report (``fp32``, ``int8``, ``int8-static``, ...).
        text_variant: also ship this gated text encoder (``text-fp32``, ``text-int8``; a report
            run with ``text_encoder=True``) and the device tokenizer it was gated with.

    Raises:
        GatedBundleError: no such variant, it was not kept, or a file's sha256 differs from the report.
        FileNotFoundError: ``parity.json`` is missing.
    """
    parity_dir = Path(parity_dir)
    report_path = parity_dir / PARITY_REPORT
    report = _read_report(report_path)
    subject = _kept_subject(report, variant, report_path)
    encoder = _verified(_subject_file(parity_dir, subject), subject.get("sha256"), f"{report_path} subject {variant!r}")
    head_info = report["student"].get("variant_class_head") or {}
    head_path = _verified(parity_dir / str(head_info.get("file", "")), head_info.get("sha256"),
                          f"{report_path} student.variant_class_head")
    head = np.load(head_path, allow_pickle=False)
    names = report["data"]["classnames"]
    if head.shape != (len(names), report["student"]["embed_dim"]):
        raise GatedBundleError(f"{head_path}: shape {head.shape}; the report has {len(names)} classes of "
                               f"{report['student']['embed_dim']}-d embeddings")
    text_subject = _kept_subject(report, text_variant, report_path) if text_variant else None
    certificate = certificate_for(report, subject, sha256_file(report_path), text_subject)
    extra_files: dict[str, Path] = {PARITY_REPORT: report_path}
    text_config = {}
    if text_subject is not None:
        extra_files[TEXT_ENCODER.filename] = _verified(_subject_file(parity_dir, text_subject), text_subject["sha256"],
                                                       f"{report_path} subject {text_variant!r}")
        tok = report["student"].get("text_tokenizer") or {}
        extra_files[TOKENIZER_FILE] = _verified(parity_dir / str(tok.get("file", "")), tok.get("sha256"),
                                                f"{report_path} student.text_tokenizer")
        text_config = {"text_encoder": text_encoder_config(text_subject["precision"], tok.get("source"),
                                                           variant=text_variant)}
    config = bundle_config(
        report["student"]["name"], report["student"]["fingerprint"], subject["precision"],
        report["student"]["logit_scale"], head, names, report["data"]["templates"], report["student"]["preprocess"],
        _opset(encoder), variant=variant, certificate=CERTIFICATE, **text_config,
    )
    out_dir = Path(out_dir)
    cert_tmp = parity_dir / f".{out_dir.name}.{CERTIFICATE}"
    cert_tmp.write_text(json.dumps(certificate, indent=2, ensure_ascii=False) + "\n")
    try:
        return assemble_bundle(out_dir, encoder, head_path, names, config, overwrite=overwrite,
                               extra_files={**extra_files, CERTIFICATE: cert_tmp})
    finally:
        cert_tmp.unlink(missing_ok=True)


def _read_report(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no parity report (run exports.parity first)")
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GatedBundleError(f"{path}: unreadable JSON ({type(exc).__name__}: {exc})") from exc
    if "variant_class_head" not in report.get("student", {}):
        raise GatedBundleError(f"{path}: written by an older exports.parity without the class head it "
                               "scored; run the report again")
    return report


def _kept_subject(report: Mapping[str, Any], variant: str, where: Path) -> dict[str, Any]:
    subject = next((s for s in report["subjects"] if s["name"] == variant), None)
    if subject is None:
        raise GatedBundleError(f"{where}: no variant {variant!r}; it has {[s['name'] for s in report['subjects']]}")
    if subject["role"] != "variant" or subject["status"] != "kept":
        raise GatedBundleError(f"{where}: variant {variant!r} was {subject['status']} "
                               f"({subject.get('reason') or 'not a variant'}); only kept variants ship")
    if not subject.get("sha256"):
        raise GatedBundleError(f"{where}: variant {variant!r} has no sha256 (its file was not kept)")
    return subject


def _subject_file(parity_dir: Path, subject: Mapping[str, Any]) -> Path:
    """The kept file: under ``parity_dir/onnx`` (the run's own), else the path as recorded."""
    recorded = Path(subject["path"])
    local = parity_dir / "onnx" / recorded.name
    return local if local.is_file() else recorded


def _verified(path: Path, sha256: str | None, where: str) -> Path:
    if not path.is_file():
        raise GatedBundleError(f"{path}: missing ({where} lists it)")
    actual = sha256_file(path)
    if actual != sha256:
        raise GatedBundleError(f"{path}: sha256 {actual[:12]}... differs from {str(sha256)[:12]}... in {where}; "
                               "the file changed after it was gated")
    return path


def _opset(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
