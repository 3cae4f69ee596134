"""Variants: the exported image encoder at every precision and on every runtime, or why it could not run."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from clipcore.dual_encoder import DualEncoder
from exports import providers as prov
from exports.interface import IMAGE_ENCODER
from exports.onnx_export import export_image_encoder
from exports.parity.eval_data import EvalData, calibration_reader
from exports.parity.gates import ParityInputError, precision_from_name
from exports.parity.names import KNOWN_VARIANTS
from exports.parity.results import ParitySettings
from exports.parity.subjects import Subject, error_text, failed_subject, onnx_subject, ort_embed
from exports.int8_scheme import AUTO_INT8, choose_int8_scheme
from exports.precision import (
    CALIBRATED,
    VARIANT_PRECISIONS,
    ArrayCalibrationReader,
    load_onnx_model,
    make_variant,
)
from exports.qat_ranges import ActivationRanges, activation_ranges
from exports.runtime import OnnxGraph, image_io_mismatch


def ranges_note(ranges: ActivationRanges) -> str:
    """What the report says of a QAT student's ranges: how many reached the int8 graph."""
    hit = sum(1 for names in ranges.matched.values() if names)
    return f"activation ranges from QAT ({hit} of {len(ranges.sites)} matched; the rest calibrated)"


def cpu_variant(name: str, fp32: Path, student: Subject, head: np.ndarray, onnx_dir: Path,
                calibration: Callable[[], ArrayCalibrationReader], threads: int | None,
                ranges: ActivationRanges | None = None, float_layers: int = 0) -> Subject:
    """Write and open one onnxruntime CPU variant; a failure becomes an ``error`` subject.

    ``int8`` is reported under its name with the precision of the scheme it chose, and why.
    ``ranges``: a QAT student's activation ranges, used by static int8 instead of calibrated ones.
    ``float_layers``: static int8 keeps the first this many weighted layers fp32.
    """
    path = fp32 if name == "fp32" else onnx_dir / f"image_encoder.{name}.onnx"
    scheme, why = choose_int8_scheme(fp32) if name == AUTO_INT8 else (name, None)
    static = scheme == "int8-static"
    try:
        if name != "fp32":
            make_variant(fp32, path, scheme, calibration() if scheme in CALIBRATED else None, ranges=ranges,
                         float_layers=float_layers)
        subject = onnx_subject(name, scheme, path, student, head, owns_file=True, threads=threads)
        learnt = ranges_note(ranges) if ranges is not None and static else None
        mixed = f"the first {float_layers} weighted layers fp32" if static and float_layers else None
        subject.reason = ", ".join(filter(None, [why, learnt, mixed])) or None
        return subject
    except Exception as exc:  # quantiser and converter errors are reported, not fatal
        return failed_subject(name, scheme, "error", error_text(exc), "onnxruntime-cpu")


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
        return failed_subject(name, precision, "error", error_text(exc), runtime)
    return onnx_subject(name, precision, fp32, student, head, owns_file=False, threads=threads,
                        runtime=runtime, embed=embed)


def check_variant_names(variants: Sequence[str]) -> list[str]:
    if not variants:  # nothing gated would read as PASSED
        raise ParityInputError(f"the variant list is empty; expected some of {list(KNOWN_VARIANTS)}")
    unknown = [v for v in variants if v not in KNOWN_VARIANTS]
    if unknown:
        raise ParityInputError(f"unknown variants {unknown}; expected some of {list(KNOWN_VARIANTS)}")
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
    clash = [n for n in files if n in KNOWN_VARIANTS or n in ("teacher", "student")]
    if clash:
        raise ParityInputError(f"--onnx names {clash} clash with built-in subjects; choose other names")
    checked = {}
    for name, path in files.items():
        load_onnx_model(path)
        graph = OnnxGraph(path, IMAGE_ENCODER)  # loadable, with the image encoder's input name
        mismatch = image_io_mismatch(graph, image_shape, embed_dim)
        if mismatch is not None:
            raise ParityInputError(f"--onnx {name}={path}: {_describe(mismatch)}")
        checked[name] = Path(path)
    return checked


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

    ranges = activation_ranges(student, IMAGE_ENCODER.inputs[0].name)
    out = []
    for name in variants:
        if name in VARIANT_PRECISIONS:
            out.append(cpu_variant(name, fp32, reference, head, onnx_dir, calibration, settings.threads, ranges,
                                   settings.int8_float_layers))
        else:
            out.append(accelerated_variant(name, fp32, reference, head, info, input_shape=shape, max_batch=max_batch,
                                           cache_dir=onnx_dir / "trt_cache", threads=settings.threads))
    for name, path in extra.items():
        out.append(onnx_subject(name, precision_from_name(name), path, reference, head, owns_file=False,
                                threads=settings.threads))
    return out


def _describe(mismatch: tuple[str, list, tuple]) -> str:
    what, got, want = mismatch
    if what == "input":
        return (f"input {IMAGE_ENCODER.inputs[0].name} has shape {got}; "
                f"the student takes (batch, {', '.join(map(str, want))})")
    return f"output has shape {got}; the student's embeddings are {want[0]}-dimensional"
