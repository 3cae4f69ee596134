"""The labelled evaluation set and the class heads (zero-shot class embeddings) of every subject."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from clipcore.classnames import classnames_for
from clipcore.data import DataSpec, DataSpecError, ImageDataset, load_hf_dataset, make_loader, resolve_columns
from clipcore.dual_encoder import DualEncoder
from clipcore.templates import get_templates
from clipcore.zeroshot import build_classifier, validate_zeroshot_inputs
from exports.interface import IMAGE_ENCODER, TEXT_ENCODER
from exports.onnx_export import compare_outputs, export_text_encoder
from exports.parity.gates import ParityInputError
from exports.parity.results import ParitySettings
from exports.precision import ArrayCalibrationReader
from exports.runtime import OnnxGraph, l2_normalize


@dataclass
class EvalData:
    dataset: ImageDataset
    classnames: list[str]
    spec: DataSpec
    calibration_source: str | None = None  # set once int8-static has read its calibration images
    rows: np.ndarray | None = None  # dataset row of each evaluated image, set by embed_dataset


def load_eval_data(spec: DataSpec, transforms: Mapping[str, Any], classnames: str | None = None,
                   templates: str | Sequence[str] = "simple") -> EvalData:
    """The labelled evaluation set, decoded and preprocessed once per transform.

    Class names, ``templates`` and every label are checked together here, before any image is
    embedded (:func:`clipcore.zeroshot.validate_zeroshot_inputs`).

    Raises:
        DataSpecError: missing data, no label column, or labels without class names.
        ParityInputError: duplicate class names, a bad template, labels past the class names.
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
    try:
        names, _ = validate_zeroshot_inputs(names, templates, ds[cols.label], source=f"{spec.label} column {cols.label!r}")
    except ValueError as exc:
        raise ParityInputError(str(exc)) from exc
    return EvalData(ImageDataset(ds, dict(transforms), columns=cols, name=spec.label), names, spec)


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
                 compare_outputs({"head": student_head}, {"head": head})["head"].max_abs_diff)


def calibration_reader(data: EvalData, transform: Any, settings: ParitySettings) -> tuple[ArrayCalibrationReader, str]:
    """Preprocessed calibration batches for ``int8-static`` (undecodable images dropped)."""
    base = data.spec if settings.calibration_data is None else DataSpec(path=settings.calibration_data)
    spec = replace(base, split=settings.calibration_split, limit=settings.calibration_limit,
                   shuffle_seed=settings.calibration_seed)
    try:
        dataset = ImageDataset.from_spec(spec, {"student": transform})
        source = spec.label
    except DataSpecError:
        if settings.calibration_data is not None:  # asked for explicitly: no silent fallback
            raise
        spec = replace(data.spec, limit=settings.calibration_limit, shuffle_seed=settings.calibration_seed)
        dataset = ImageDataset.from_spec(spec, {"student": transform})
        source = f"{spec.label} (the evaluation split: no {settings.calibration_split!r} split)"
    batches = [{IMAGE_ENCODER.inputs[0].name: b["pixel_values_student"].numpy()}
               for b in make_loader(dataset, batch_size=16) if len(b["index"])]
    if not batches:
        raise DataSpecError(f"{source}: no decodable calibration image for int8-static")
    return ArrayCalibrationReader(batches), source
