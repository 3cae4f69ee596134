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
from exports.interface import DEFAULT_OPSET, IMAGE_ENCODER
from exports.onnx_export import export_image_encoder
from exports.precision import PRECISIONS, ImageCalibrationReader, make_variant
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
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
) -> Path:
    """Export ``model``'s image tower and zero-shot head for ``classnames`` into ``out_dir``.

    Args:
        templates: a template-set name (``"simple"``, ``"openai_imagenet"``, ...) or prompt strings.
        precision: one of ``fp32``, ``fp16``, ``int8-dynamic``, ``int8-static``.
        calibration_images: images for ``int8-static`` (paths, bytes, PIL images; any mode),
            preprocessed with the model's own transform.
        class_embeddings: a precomputed (C, D) head (e.g. from ``build_classifier``); built with
            :func:`clipcore.zeroshot.build_classifier` when omitted.
        overwrite: replace an existing non-empty ``out_dir``.

    Returns:
        ``out_dir``. The directory appears complete or not at all: it is assembled beside the
        target and renamed into place.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}; expected one of {PRECISIONS}")
    if precision == "int8-static" and not calibration_images:
        raise ValueError("precision 'int8-static' needs calibration_images (a few hundred real images)")
    names, temps = validate_zeroshot_inputs(classnames, templates)
    temps = list(temps)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{out_dir}: exists and is not empty; pass overwrite=True to replace it")

    if class_embeddings is None:
        class_embeddings = build_classifier(model, names, temps)
    head = torch.as_tensor(class_embeddings).detach().float().cpu()
    if head.shape != (len(names), model.embed_dim):
        raise ValueError(f"class_embeddings shape {tuple(head.shape)}; expected ({len(names)}, {model.embed_dim})")
    head = torch.nn.functional.normalize(head, dim=-1).numpy()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        with tempfile.TemporaryDirectory(prefix="clip-export-") as work:
            fp32 = export_image_encoder(model, Path(work) / "image_encoder.fp32.onnx", opset=opset)
            calibration = (
                ImageCalibrationReader(calibration_images, model.image_transform) if precision == "int8-static" else None
            )
            make_variant(fp32, staging / IMAGE_ENCODER.filename, precision, calibration)
        (staging / CLASSES).write_text(json.dumps(names, ensure_ascii=False, indent=1) + "\n")
        np.save(staging / TEXT_EMBEDDINGS, head.astype(np.float32), allow_pickle=False)
        config = {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "model": model.name,
            "fingerprint": model.fingerprint(),
            "precision": precision,
            "logit_scale": float(model.logit_scale.detach().float().item()),
            "embed_dim": int(head.shape[1]),
            "num_classes": len(names),
            "templates": temps,
            "preprocess": model.image_transform.to_dict(),
            "image_encoder": {
                "file": IMAGE_ENCODER.filename,
                "inputs": IMAGE_ENCODER.input_names,
                "outputs": IMAGE_ENCODER.output_names,
                "opset": opset,
            },
            "created_with": _versions(),
        }
        (staging / CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        write_manifest(staging, [IMAGE_ENCODER.filename, CLASSES, TEXT_EMBEDDINGS, CONFIG])
        if out_dir.exists():
            shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
