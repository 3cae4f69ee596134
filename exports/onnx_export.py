"""Export any :class:`~clipcore.dual_encoder.DualEncoder` to ONNX and measure parity with torch.

Three graphs, named and shaped in :mod:`exports.interface`:

* ``image_encoder``: ``pixel_values`` (B, 3, H, W) -> ``image_embeds`` (B, D), unit norm;
* ``text_encoder``: ``input_ids``, ``attention_mask`` (B, L) int64 -> ``text_embeds`` (B, D), unit norm;
* ``zeroshot_classifier``: ``pixel_values`` -> ``logits``, ``probs`` (B, C), with the class
  embeddings and the logit scale baked in as constants.

The wrappers below call ``encode_image`` / ``encode_tokens``, the very methods training and
evaluation use, so the exported graphs cannot drift from the torch definitions. For Hugging
Face CLIP models :func:`export_optimum` additionally writes optimum's single-graph layout,
which ``optimum.onnxruntime.ORTModelForZeroShotImageClassification`` loads; it needs the optional
``optimum`` extra (``optimum-onnx``, imported only when called) and nothing else here does.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from clipcore.dual_encoder import DualEncoder, HFDualEncoder, ModelNotFoundError
from exports.interface import DEFAULT_OPSET, IMAGE_ENCODER, TEXT_ENCODER, ZERO_SHOT_CLASSIFIER, GraphSpec
from exports.precision import load_onnx_model
from exports.runtime import OnnxGraph, load_session


class ImageEncoderGraph(nn.Module):
    def __init__(self, model: DualEncoder):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)


class TextEncoderGraph(nn.Module):
    def __init__(self, model: DualEncoder):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_tokens(input_ids, attention_mask)


class ZeroShotGraph(nn.Module):
    """Pixels -> class logits and probabilities for a fixed zero-shot head.

    Args:
        class_embeddings: (C, D) unit rows, e.g. from :func:`clipcore.zeroshot.build_classifier`.
    """

    def __init__(self, model: DualEncoder, class_embeddings: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("class_embeddings", class_embeddings.detach().float().clone())
        # a plain constant, not the trainable parameter, so the graph folds it
        self.register_buffer("logit_scale", model.logit_scale.detach().float().reshape(()).clone())

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.model.encode_image(pixel_values)
        logits = self.logit_scale * emb @ self.class_embeddings.t()
        return logits, logits.softmax(dim=-1)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode without gradients for the block; each submodule's own mode is restored."""
    # restore each submodule's own flag: a fresh wrapper is in training mode while the frozen
    # teacher inside it is not, and model.train(flag) would overwrite both
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes.items():
            m.training = training


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], spec: GraphSpec, path: str | Path, opset: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with eval_mode(module), warnings.catch_warnings():
        # TorchScript tracing warns about every shape-dependent Python branch in transformers
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            module, args, str(path),
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            # the TorchScript exporter, as optimum uses; the dynamo exporter needs onnxscript,
            # which the export extra does not install
            dynamo=False,
        )
    load_onnx_model(path)  # onnx.checker with full shape inference
    return path


def example_pixels(model: DualEncoder, batch_size: int = 2, seed: int = 0) -> torch.Tensor:
    h, w = model.image_transform.output_size
    return torch.randn(batch_size, 3, h, w, generator=torch.Generator().manual_seed(seed))


def example_tokens(model: DualEncoder, texts: Sequence[str] = ("a photo of a cat.", "a diagram")) -> dict[str, torch.Tensor]:
    """Two texts of different lengths, so that padding and the mask are traced."""
    tokens = model.tokenize(list(texts))
    ids = tokens["input_ids"]
    return {"input_ids": ids, "attention_mask": tokens.get("attention_mask", torch.ones_like(ids))}


def export_image_encoder(model: DualEncoder, path: str | Path, *, opset: int = DEFAULT_OPSET) -> Path:
    """Export ``model.encode_image`` as ``image_encoder``; returns ``path``."""
    return _export(ImageEncoderGraph(model), (example_pixels(model).to(model.device),), IMAGE_ENCODER, path, opset)


def export_text_encoder(
    model: DualEncoder, path: str | Path, *, opset: int = DEFAULT_OPSET, tokens: Mapping[str, torch.Tensor] | None = None
) -> Path:
    """Export ``model.encode_tokens`` as ``text_encoder``; ``tokens`` defaults to :func:`example_tokens`."""
    tokens = dict(tokens or example_tokens(model))
    args = (tokens["input_ids"].to(model.device), tokens["attention_mask"].to(model.device))
    return _export(TextEncoderGraph(model), args, TEXT_ENCODER, path, opset)


def export_zeroshot_classifier(
    model: DualEncoder, class_embeddings: torch.Tensor, path: str | Path, *, opset: int = DEFAULT_OPSET
) -> Path:
    """Export the fused pixels -> probabilities graph for a fixed (C, D) zero-shot head."""
    module = ZeroShotGraph(model, class_embeddings.to(model.device))
    return _export(module, (example_pixels(model).to(model.device),), ZERO_SHOT_CLASSIFIER, path, opset)


def export_dual_encoder(model: DualEncoder, out_dir: str | Path, *, opset: int = DEFAULT_OPSET) -> dict[str, Path]:
    """Both towers as separate graphs: ``{"image_encoder": path, "text_encoder": path}``."""
    out_dir = Path(out_dir)
    return {
        IMAGE_ENCODER.name: export_image_encoder(model, out_dir / IMAGE_ENCODER.filename, opset=opset),
        TEXT_ENCODER.name: export_text_encoder(model, out_dir / TEXT_ENCODER.filename, opset=opset),
    }


def optimize_onnx(src: str | Path, dst: str | Path, *, level: str = "extended") -> Path:
    """Write onnxruntime's optimised graph (fusions, constant folding) of ``src`` to ``dst``.

    The result is tied to this onnxruntime version and the CPU provider; ``extended`` avoids the
    hardware-specific layout changes that ``all`` adds. Sessions opened by
    :func:`exports.runtime.load_session` apply ``all`` at load time anyway, so bundles ship the
    portable unoptimised graph.
    """
    load_session(src, optimization=level, optimized_model_path=dst)
    return Path(dst)


# ----------------------------------------------------------------------------- parity


@dataclass(frozen=True)
class OutputDiff:
    """How far one candidate output is from its reference (in the style of optimum's validator)."""

    name: str
    shape: tuple[int, ...]
    max_abs_diff: float
    mean_abs_diff: float
    min_cosine: float  # worst row-wise cosine similarity
    mean_cosine: float
    finite: bool

    def to_dict(self) -> dict:
        return asdict(self)


def compare_outputs(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]) -> dict[str, OutputDiff]:
    """Per-output differences for every name in ``reference``.

    Raises:
        ValueError: an output is missing from ``candidate`` or has another shape.
    """
    diffs = {}
    for name, ref in reference.items():
        if name not in candidate:
            raise ValueError(f"output {name!r} missing from candidate (has {sorted(candidate)})")
        ref = np.asarray(ref, np.float64)
        got = np.asarray(candidate[name], np.float64)
        if ref.shape != got.shape:
            raise ValueError(f"output {name!r}: shape {got.shape} differs from reference {ref.shape}")
        delta = np.abs(ref - got)
        r2, g2 = ref.reshape(ref.shape[0] if ref.ndim else 1, -1), got.reshape(got.shape[0] if got.ndim else 1, -1)
        cos = (r2 * g2).sum(1) / np.maximum(np.linalg.norm(r2, axis=1) * np.linalg.norm(g2, axis=1), 1e-12)
        diffs[name] = OutputDiff(
            name=name,
            shape=tuple(ref.shape),
            max_abs_diff=float(np.nanmax(delta)) if delta.size else 0.0,
            mean_abs_diff=float(np.nanmean(delta)) if delta.size else 0.0,
            min_cosine=float(np.nanmin(cos)) if cos.size else 1.0,
            mean_cosine=float(np.nanmean(cos)) if cos.size else 1.0,
            finite=bool(np.isfinite(got).all()),
        )
    return diffs


def torch_outputs(module: nn.Module, spec: GraphSpec, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run one of the graph wrappers above in torch on numpy ``feeds``; ``{output name: array}``."""
    device = next(module.parameters()).device
    args = [torch.from_numpy(np.ascontiguousarray(feeds[t.name], dtype=t.dtype)).to(device) for t in spec.inputs]
    with eval_mode(module):
        out = module(*args)
    out = out if isinstance(out, (tuple, list)) else (out,)
    return {name: o.detach().float().cpu().numpy() for name, o in zip(spec.output_names, out)}


def graph_parity(
    module: nn.Module, onnx_path: str | Path, spec: GraphSpec, feeds: Mapping[str, np.ndarray], **session_kwargs
) -> dict[str, OutputDiff]:
    """Compare torch ``module`` (a wrapper above) with the ONNX file on the same inputs."""
    reference = torch_outputs(module, spec, feeds)
    candidate = OnnxGraph(onnx_path, spec, **session_kwargs).run(feeds)
    return compare_outputs(reference, candidate)


# ----------------------------------------------------------------------------- optimum


def export_optimum(
    model: DualEncoder | str | Path,
    out_dir: str | Path,
    *,
    task: str = "zero-shot-image-classification",
    opset: int = DEFAULT_OPSET,
    validate: bool = True,
) -> Path:
    """Export a Hugging Face CLIP-family model in optimum's layout (``model.onnx`` + configs).

    ``out_dir`` then loads with ``optimum.onnxruntime.ORTModelForZeroShotImageClassification``
    (task ``zero-shot-image-classification``) or ``ORTModelForFeatureExtraction``. The graph
    returns ``logits_per_image``, ``logits_per_text``, ``text_embeds``, ``image_embeds``.

    Args:
        model: a local model directory / hub id, or an in-memory :class:`HFDualEncoder`
            (e.g. a trained student); its tokenizer and image processor are saved alongside.
        validate: let optimum compare ONNX Runtime against torch on dummy inputs.

    Raises:
        ModelNotFoundError: a path that is not a model directory.
        TypeError: a dual encoder that is not a transformers model optimum can export.
    """
    out_dir = Path(out_dir)
    if isinstance(model, (str, Path)):
        path = Path(model)
        if path.exists() and not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{path}: not a Hugging Face model directory (no config.json); export_optimum needs a saved "
                "CLIP-family model (save_pretrained) or an in-memory HFDualEncoder"
            )
        with _quiet():
            _optimum_exporters().main_export(str(model), out_dir, task=task, opset=opset, do_validation=validate,
                                             device="cpu")
        return out_dir
    if not isinstance(model, HFDualEncoder):
        raise TypeError(
            f"export_optimum needs a transformers-backed HFDualEncoder, got {type(model).__name__}; "
            "use export_dual_encoder for other dual encoders"
        )
    exporters = _optimum_exporters()
    with eval_mode(model), _quiet():
        exporters.onnx_export_from_model(model.model, out_dir, task=task, opset=opset, do_validation=validate,
                                         device="cpu")
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(out_dir)
    image_processor_from_transform(model.image_transform).save_pretrained(out_dir)
    return out_dir


class OptimumMissingError(ImportError):
    """``optimum-onnx`` is not installed; the message says how to get it."""


def _optimum_exporters():
    """``optimum.exporters.onnx``, imported only when asked for: it is an optional extra."""
    try:
        from optimum.exporters import onnx as exporters
    except ImportError as exc:
        raise OptimumMissingError(
            f"export_optimum needs optimum-onnx, which is not installed ({exc}); install it with "
            "`pip install -e '.[optimum]'` (optimum-onnx 0.1 supports transformers 4.x only, <4.58). "
            "export_dual_encoder writes the project's own ONNX graphs without it."
        ) from exc
    return exporters


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def image_processor_from_transform(transform):
    """A ``CLIPImageProcessor`` that reproduces an :class:`~clipcore.imaging.ImageTransform`."""
    from PIL import Image
    from transformers import CLIPImageProcessor

    size = {"shortest_edge": transform.size} if isinstance(transform.size, int) else dict(
        zip(("height", "width"), transform.size)
    )
    crop = transform.crop_size
    return CLIPImageProcessor(
        do_resize=True,
        size=size,
        resample=int(Image.Resampling[transform.resample.upper()]),
        do_center_crop=crop is not None,
        crop_size={"height": crop[0], "width": crop[1]} if crop is not None else None,
        do_rescale=True,
        rescale_factor=transform.rescale_factor,
        do_normalize=True,
        image_mean=list(transform.mean),
        image_std=list(transform.std),
        do_convert_rgb=True,
    )
