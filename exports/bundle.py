"""Write edge bundles: an image encoder at a chosen precision plus a precomputed zero-shot head.

The bundle layout is documented in :mod:`exports.runtime`, which reads it without torch.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from clipcore.dual_encoder import DualEncoder
from clipcore.zeroshot import build_classifier, validate_zeroshot_inputs
from exports.interface import DEFAULT_OPSET, IMAGE_ENCODER, TEXT_ENCODER
from exports.onnx_export import export_image_encoder, export_text_encoder
from exports.text_runtime import TOKENIZER_FILE
from exports.int8_scheme import resolve_precision
from exports.qat_ranges import activation_ranges
from exports.precision import CALIBRATED, VARIANT_PRECISIONS, ImageCalibrationReader, make_variant
from exports.runtime import (
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    CLASSES,
    CONFIG,
    TEXT_EMBEDDINGS,
    write_manifest,
)


def write_bundle(
    model: DualEncoder,
    classnames: Sequence[str],
    templates: str | Sequence[str],
    out_dir: str | Path,
    *,
    precision: str = "fp32",
    calibration_images: Sequence[Any] | None = None,
    class_embeddings: torch.Tensor | np.ndarray | None = None,
    text_encoder: bool = False,
    text_precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
) -> Path:
    """Export ``model``'s image tower and zero-shot head for ``classnames`` into ``out_dir``.

    Args:
        templates: a template-set name (``"simple"``, ``"openai_imagenet"``, ...) or prompt strings.
        precision: one of ``fp32``, ``fp16``, ``int8-dynamic``, ``int8-static``, or ``int8``: the
            scheme that suits the graph (static for CNNs, which then needs calibration images).
        calibration_images: images for ``int8-static`` (paths, bytes, PIL images; any mode),
            preprocessed with the model's own transform.
        class_embeddings: a precomputed (C, D) head (e.g. from ``build_classifier``); built with
            :func:`clipcore.zeroshot.build_classifier` when omitted.
        text_encoder: also ship the text tower (the model's, or its teacher's for image-only
            students) as ONNX at ``text_precision`` with its device tokenizer, so that
            ``exports.predict --classes`` can build heads for new class names.
        overwrite: replace an existing non-empty ``out_dir``.

    Returns:
        ``out_dir``. The directory appears complete or not at all: it is assembled beside the
        target and renamed into place.
    """
    if precision not in VARIANT_PRECISIONS:
        raise ValueError(f"precision {precision!r}; expected one of {VARIANT_PRECISIONS}")
    names, temps = validate_zeroshot_inputs(classnames, templates)
    temps = list(temps)
    out_dir = Path(out_dir)
    _check_target(out_dir, overwrite)

    if class_embeddings is None:
        class_embeddings = build_classifier(model, names, temps)
    head = torch.as_tensor(class_embeddings).detach().float().cpu()
    if head.shape != (len(names), model.embed_dim):
        raise ValueError(f"class_embeddings shape {tuple(head.shape)}; expected ({len(names)}, {model.embed_dim})")
    head = torch.nn.functional.normalize(head, dim=-1).numpy()
    if not np.isfinite(head).all():
        raise ValueError(f"the zero-shot head of {model.name} holds NaN or inf (its text embeddings are not finite); "
                         f"no bundle is written to {out_dir}")

    with tempfile.TemporaryDirectory(prefix="clip-export-") as work:
        fp32 = export_image_encoder(model, Path(work) / "image_encoder.fp32.onnx", opset=opset)
        scheme = resolve_precision(precision, fp32)
        if scheme in CALIBRATED and not calibration_images:
            raise ValueError(f"precision {precision!r} ({scheme} for this graph) needs calibration_images "
                             "(a few hundred real images)")
        calibration = ImageCalibrationReader(calibration_images, model.image_transform) if scheme in CALIBRATED else None
        encoder = make_variant(fp32, Path(work) / IMAGE_ENCODER.filename, scheme, calibration,
                               ranges=activation_ranges(model, IMAGE_ENCODER.inputs[0].name))
        text_files, text_config = _text_parts(model, Path(work), text_precision, opset) if text_encoder else ({}, {})
        config = bundle_config(model.name, model.fingerprint(), scheme, float(model.logit_scale.detach().float().item()),
                               head, names, temps, model.image_transform.to_dict(), opset, **text_config)
        return assemble_bundle(out_dir, encoder, head, names, config, extra_files=text_files, overwrite=overwrite)


def _text_parts(model: DualEncoder, work: Path, precision: str, opset: int) -> tuple[dict[str, Path], dict[str, Any]]:
    from exports.text_bundle import save_device_tokenizer, text_model

    tower = text_model(model)
    fp32 = export_text_encoder(tower, work / "text_encoder.fp32.onnx", opset=opset)
    scheme = resolve_precision(precision, fp32)
    encoder = fp32 if scheme == "fp32" else make_variant(fp32, work / f"text_encoder.{scheme}.onnx", scheme)
    tokenizer = save_device_tokenizer(tower, work / TOKENIZER_FILE)
    return ({TEXT_ENCODER.filename: encoder, TOKENIZER_FILE: tokenizer},
            {"text_encoder": text_encoder_config(scheme, tower.name)})


def bundle_config(model: str, fingerprint: str, precision: str, logit_scale: float, head: np.ndarray,
                  names: Sequence[str], templates: Sequence[str], preprocess: dict[str, Any], opset: int,
                  **extra: Any) -> dict[str, Any]:
    """The bundle's ``config.json`` (see :mod:`exports.runtime`)."""
    return {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "model": model,
        "fingerprint": fingerprint,
        "precision": precision,
        "logit_scale": float(logit_scale),
        "embed_dim": int(head.shape[1]),
        "num_classes": len(names),
        "templates": list(templates),
        "preprocess": preprocess,
        "image_encoder": {
            "file": IMAGE_ENCODER.filename,
            "inputs": IMAGE_ENCODER.input_names,
            "outputs": IMAGE_ENCODER.output_names,
            "opset": int(opset),
        },
        **extra,
        "created_with": _versions(),
    }


def assemble_bundle(out_dir: str | Path, encoder: str | Path, head: np.ndarray | Path, names: Sequence[str],
                    config: dict[str, Any], *, extra_files: dict[str, str | Path] | None = None,
                    overwrite: bool = False) -> Path:
    """Write a bundle from finished parts: the encoder file (and a head given as a ``.npy`` path)
    are copied byte for byte.

    ``extra_files`` (``{name in the bundle: source file}``) are copied too and listed in the
    manifest. The directory appears complete or not at all: it is assembled beside the target
    and renamed into place.
    """
    out_dir = Path(out_dir)
    _check_target(out_dir, overwrite)
    check_encoder_outputs(encoder, config)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        shutil.copyfile(encoder, staging / IMAGE_ENCODER.filename)
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, staging / name)
        (staging / CLASSES).write_text(json.dumps(list(names), ensure_ascii=False, indent=1) + "\n")
        if isinstance(head, Path):
            shutil.copyfile(head, staging / TEXT_EMBEDDINGS)
        else:
            np.save(staging / TEXT_EMBEDDINGS, np.ascontiguousarray(head, dtype=np.float32), allow_pickle=False)
        (staging / CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        write_manifest(staging, [IMAGE_ENCODER.filename, CLASSES, TEXT_EMBEDDINGS, CONFIG, *(extra_files or {})])
        if out_dir.exists():
            shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def check_encoder_outputs(encoder: str | Path, config: dict[str, Any]) -> None:
    """One forward pass of the image encoder on a fixed probe input must give finite embeddings:
    finite weights can still overflow to NaN, and a bundle is a promise that the model works.

    Raises:
        ValueError: naming the encoder file; nothing is written.
    """
    from clipcore.imaging import ImageTransform
    from exports.runtime import OnnxGraph

    size = ImageTransform.from_dict(config["preprocess"]).output_size
    pixels = np.random.default_rng(0).standard_normal((2, 3, *size)).astype(np.float32)
    out = OnnxGraph(encoder, IMAGE_ENCODER, threads=1).run({IMAGE_ENCODER.inputs[0].name: pixels})
    emb = out[IMAGE_ENCODER.outputs[0].name]
    if not np.isfinite(emb).all():
        raise ValueError(f"{encoder}: gives NaN or inf image embeddings for a probe input (the model diverged or "
                         "overflows); no bundle is written")


def text_encoder_config(precision: str, source: str | None, **extra: Any) -> dict[str, Any]:
    """``config.json``'s ``text_encoder`` entry of an open-vocabulary bundle (see :mod:`exports.text_runtime`)."""
    return {"file": TEXT_ENCODER.filename, "tokenizer": TOKENIZER_FILE, "precision": precision, "source": source,
            "inputs": TEXT_ENCODER.input_names, "outputs": TEXT_ENCODER.output_names, **extra}


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{out_dir}: exists and is not empty; pass overwrite=True to replace it")


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
