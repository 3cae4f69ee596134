"""The parity certificate a bundle carries: a summary of the report for the variant it ships.

No torch and no onnx: the edge runtime prints it (``predict --info``).
"""

from __future__ import annotations

from typing import Any, Mapping

from exports.runtime import PARITY_REPORT

CERTIFICATE_FORMAT = "clip-distill-parity-certificate"
CERTIFICATE_VERSION = 1
SUMMARY_METRICS = ("top1", "top5", "top1_drop", "agreement_student", "agreement_teacher", "kl_student",
                   "emb_cos_min", "emb_cos_mean")


def certificate_for(report: Mapping[str, Any], subject: Mapping[str, Any], report_sha256: str,
                    text_subject: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The summary of ``report`` that vouches for ``subject`` (and the shipped text encoder)."""
    subjects = {s["name"]: s for s in report["subjects"]}
    data = report["data"]
    text = None if text_subject is None else {
        "variant": text_subject["name"], "precision": text_subject["precision"], "status": text_subject["status"],
        "gate": {"name": text_subject.get("gate"), "checks": text_subject.get("checks", [])},
        "metrics": {k: text_subject.get("metrics", {}).get(k) for k in SUMMARY_METRICS},
        "sha256": {"text_encoder": text_subject["sha256"], "tokenizer": report["student"]["text_tokenizer"]["sha256"]},
    }
    return {
        "format": CERTIFICATE_FORMAT,
        "version": CERTIFICATE_VERSION,
        "variant": subject["name"],
        "precision": subject["precision"],
        "status": subject["status"],
        "report_created": report.get("created"),
        "report_passed": report.get("passed"),
        "teacher": {k: report["teacher"].get(k) for k in ("name", "fingerprint")},
        "student": {k: report["student"].get(k) for k in ("name", "fingerprint")},
        "data": {k: data.get(k) for k in ("path", "split", "limit", "num_images", "num_failed", "num_classes")}
        | {"num_templates": len(data.get("templates", []))},
        "gate": {"name": subject.get("gate"), "checks": subject.get("checks", [])},
        "metrics": {k: subject.get("metrics", {}).get(k) for k in SUMMARY_METRICS},
        "teacher_top1": subjects["teacher"]["metrics"].get("top1"),
        "student_top1": subjects["student"]["metrics"].get("top1"),
        "sha256": {"image_encoder": subject["sha256"],
                   "text_embeddings": report["student"]["variant_class_head"]["sha256"],
                   PARITY_REPORT: report_sha256},
        "text_encoder": text,
    }


def format_certificate(cert: Mapping[str, Any]) -> str:
    """The certificate for people (``predict --info``)."""
    def pct(v: Any) -> str:
        return "-" if v is None else f"{100 * v:.2f} %"

    d, m = cert["data"], cert["metrics"]
    lines = [
        f"certificate: variant {cert['variant']} ({cert['precision']}) {cert['status']} by the parity report of "
        f"{cert['report_created']}",
        f"  teacher {cert['teacher']['name']} / student {cert['student']['name']}",
        f"  data: {d['path']}[{d['split']}], {d['num_images']} images, {d['num_classes']} classes, "
        f"{d['num_templates']} templates",
        f"  top-1: teacher {pct(cert['teacher_top1'])}, student {pct(cert['student_top1'])}, "
        f"this file {pct(m['top1'])}",
        f"  agreement: with the student {pct(m['agreement_student'])}, with the teacher {pct(m['agreement_teacher'])}",
        f"  gate {cert['gate']['name']}:",
    ]
    for c in cert["gate"]["checks"]:
        value = "not measured" if c["value"] is None else f"{c['value']:.6g}"
        lines.append(f"    {c['field']}: {c['metric']} = {value} {c['op']} {c['threshold']:g}  "
                     f"{'pass' if c['passed'] else 'FAIL'}")
    lines.append("  sha256: " + ", ".join(f"{k} {v[:16]}..." for k, v in cert["sha256"].items()))
    text = cert.get("text_encoder")
    if text:
        tm = text["metrics"]
        lines.append(f"  text encoder {text['variant']} ({text['precision']}) {text['status']}: prompt cosine min "
                     f"{tm['emb_cos_min']:.6f}, agreement with the student's head {pct(tm['agreement_student'])}")
        for c in text["gate"]["checks"]:
            value = "not measured" if c["value"] is None else f"{c['value']:.6g}"
            lines.append(f"    {c['field']}: {c['metric']} = {value} {c['op']} {c['threshold']:g}  "
                         f"{'pass' if c['passed'] else 'FAIL'}")
    return "\n".join(lines)
