"""Edge runtime: ONNX sessions and zero-shot bundles with onnxruntime, numpy and pillow only.

Nothing here imports torch, transformers or onnx; image decoding and preprocessing come from
:mod:`clipcore.imaging`, which is torch-free by design. A bundle is a directory written by
:func:`exports.bundle.write_bundle`::

    image_encoder.onnx     pixels -> L2-normalised image embeddings (fp32, fp16 or int8)
    text_embeddings.npy    (num_classes, embed_dim) float32, unit rows: the zero-shot head
    classes.json           class names, in the row order of text_embeddings.npy
    config.json            logit scale, precision, preprocessing spec, graph I/O names, provenance
    manifest.json          sha256 and size of every file above
    parity.json            (bundles from a parity run) the report the image encoder passed
    certificate.json       (bundles from a parity run) its summary: data, gate checks, accuracies

:func:`load_bundle` checks every hash before it reads anything, so a bundle that was edited,
truncated or half-copied is refused with the name of the offending file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnxruntime as ort

from clipcore.imaging import ImageTransform, decode_image
# the bundle's file names, errors and integrity checks live in exports.bundle_files; imported from here too
from exports.bundle_files import (  # noqa: F401
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    CERTIFICATE,
    CLASSES,
    CONFIG,
    MANIFEST,
    PARITY_REPORT,
    REQUIRED_FILES,
    TEXT_EMBEDDINGS,
    BundleError,
    read_json,
    certified_files,
    sha256_file,
    verify_bundle,
    write_manifest,
)
from exports.interface import IMAGE_ENCODER, GraphSpec

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class InvalidModelError(ValueError):
    """A file is not a loadable ONNX model; the message names the file."""


class NonFiniteOutputError(BundleError):
    """The image encoder gave NaN or inf: no probability is made up from it; the message names the file."""


# ----------------------------------------------------------------------------- sessions


def session_options(
    optimization: str = "all", threads: int | None = None, optimized_model_path: str | Path | None = None
) -> ort.SessionOptions:
    """onnxruntime session options.

    Args:
        optimization: ``disable``, ``basic``, ``extended`` or ``all`` (graph fusions at load time).
        threads: intra-op threads; None lets onnxruntime use every core.
        optimized_model_path: also write the optimised graph there (it is specific to this
            onnxruntime version and execution provider; ship the unoptimised file).
    """
    if optimization not in _OPT_LEVELS:
        raise ValueError(f"optimization={optimization!r}; expected one of {sorted(_OPT_LEVELS)}")
    so = ort.SessionOptions()
    so.graph_optimization_level = _OPT_LEVELS[optimization]
    so.log_severity_level = 3  # fp16/int8 graphs warn about CPU fallbacks on every load
    if threads is not None:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    return so


def load_session(
    path: str | Path,
    *,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    optimization: str = "all",
    optimized_model_path: str | Path | None = None,
) -> ort.InferenceSession:
    """Open an ONNX file in onnxruntime, with errors that name the file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        InvalidModelError: ``path`` is a directory, or not a valid / loadable ONNX model.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such ONNX file")
    if path.is_dir():
        hint = " (it is a zero-shot bundle: use exports.runtime.load_bundle)" if (path / MANIFEST).is_file() else ""
        raise InvalidModelError(f"{path}: is a directory, not an .onnx model file{hint}")
    so = session_options(optimization, threads, optimized_model_path)
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as exc:  # onnxruntime raises InvalidProtobuf, Fail, InvalidGraph, ... from pybind
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise InvalidModelError(f"{path}: not a valid ONNX model ({type(exc).__name__}: {first})") from exc


class OnnxGraph:
    """An onnxruntime session for one of the graphs declared in :mod:`exports.interface`."""

    def __init__(self, path: str | Path, spec: GraphSpec, **session_kwargs: Any):
        self.path = Path(path)
        self.spec = spec
        self.session = load_session(self.path, **session_kwargs)
        have = {i.name for i in self.session.get_inputs()}
        missing = [n for n in spec.input_names if n not in have]
        if missing:
            raise InvalidModelError(
                f"{self.path}: not a {spec.name} graph: inputs {sorted(have)} lack {missing}"
            )
        self.input_names = [n for n in spec.input_names if n in have]

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run with numpy inputs cast to the declared dtypes; returns ``{output name: array}``."""
        dtypes = {t.name: t.dtype for t in self.spec.inputs}
        inputs = {n: np.ascontiguousarray(feeds[n], dtype=dtypes[n]) for n in self.input_names}
        names = list(outputs or [o.name for o in self.session.get_outputs()])
        return dict(zip(names, self.session.run(names, inputs)))

    __call__ = run


# ----------------------------------------------------------------------------- classifier


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    prob: float

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "index": self.index, "prob": self.prob}


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    z = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def l2_normalize(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), eps)


@dataclass
class BundleClassifier:
    """Zero-shot classifier over a fixed class list: image encoder + precomputed text head."""

    image_encoder: OnnxGraph
    classnames: list[str]
    text_embeddings: np.ndarray  # (C, D) float32, unit rows
    logit_scale: float
    transform: ImageTransform
    config: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def precision(self) -> str:
        return str(self.config.get("precision", "fp32"))

    @property
    def certificate(self) -> dict[str, Any] | None:
        """The parity certificate shipped with the bundle (verified by the manifest), if any."""
        name = self.config.get("certificate")
        return read_json(self.path / name) if name and self.path is not None else None

    def preprocess(self, images: Sequence[Any]) -> np.ndarray:
        """Decode (any PIL mode, path, bytes, datasets dict) and transform to (N, 3, H, W) float32."""
        arrays = [self.transform(decode_image(_fspath(img), source=_source_name(img, i))) for i, img in enumerate(images)]
        return np.stack(arrays).astype(np.float32, copy=False)

    def embed(self, images: Any, batch_size: int = 32) -> np.ndarray:
        """L2-normalised image embeddings (N, D), float32."""
        images = _as_list(images)
        _check_count("batch_size", batch_size)
        if not images:
            return np.zeros((0, self.text_embeddings.shape[1]), np.float32)
        out = []
        name = self.image_encoder.spec.outputs[0].name
        for i in range(0, len(images), batch_size):
            pixels = self.preprocess(images[i : i + batch_size])
            out.append(self.image_encoder.run({IMAGE_ENCODER.inputs[0].name: pixels}, [name])[name])
        # renormalise in float32: fp16 / int8 graphs return embeddings a hair off unit length
        return l2_normalize(self._finite(np.concatenate(out)).astype(np.float32))

    def _finite(self, embeddings: np.ndarray) -> np.ndarray:
        bad = ~np.isfinite(embeddings).all(axis=-1)
        if bad.any():
            raise NonFiniteOutputError(
                f"{self.image_encoder.path}: gives NaN or inf embeddings for {int(bad.sum())} of {len(bad)} images; "
                "this model is broken (it diverged or overflowed), its probabilities would be NaN")
        return embeddings

    def logits(self, images: Any, batch_size: int = 32) -> np.ndarray:
        """``logit_scale * cos(image, class)``, shape (N, C)."""
        return np.float32(self.logit_scale) * self.embed(images, batch_size) @ self.text_embeddings.T

    def predict_proba(self, images: Any, batch_size: int = 32) -> np.ndarray:
        """Class probabilities (N, C), rows sum to 1."""
        return softmax(self.logits(images, batch_size))

    def predict(self, images: Any, top_k: int = 5, batch_size: int = 32) -> list[list[Prediction]]:
        """Top-k classes per image, most probable first; ``top_k`` above the class count gives every class.

        Images are decoded one batch at a time: memory follows ``batch_size``, not ``len(images)``.
        """
        images = _as_list(images)
        _check_count("top_k", top_k)
        _check_count("batch_size", batch_size)
        out: list[list[Prediction]] = []
        for i in range(0, len(images), batch_size):
            out += self.predict_pixels(self.preprocess(images[i : i + batch_size]), top_k)
        return out

    def predict_pixels(self, pixels: np.ndarray, top_k: int = 5) -> list[list[Prediction]]:
        """:meth:`predict` for one batch of preprocessed pixels (N, 3, H, W)."""
        _check_count("top_k", top_k)
        name = self.image_encoder.spec.outputs[0].name
        emb = self._finite(self.image_encoder.run({IMAGE_ENCODER.inputs[0].name: pixels}, [name])[name])
        probs = softmax(np.float32(self.logit_scale) * l2_normalize(emb.astype(np.float32)) @ self.text_embeddings.T)
        order = np.argsort(-probs, axis=1, kind="stable")[:, : min(int(top_k), probs.shape[1])]
        return [
            [Prediction(self.classnames[j], int(j), float(row[j])) for j in idx] for row, idx in zip(probs, order)
        ]


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")


def _as_list(images: Any) -> list[Any]:
    if isinstance(images, (str, bytes, bytearray, os.PathLike)) or hasattr(images, "mode") or isinstance(images, Mapping):
        return [images]
    return list(images)


def _fspath(value: Any) -> Any:
    # decode_image takes str paths; pathlib.Path is just as common
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _source_name(value: Any, index: int) -> str:
    if isinstance(value, (str, os.PathLike)):
        return str(value)
    return f"<image {index}>"


def load_bundle(
    directory: str | Path,
    *,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    optimization: str = "all",
) -> BundleClassifier:
    """Verify and open a bundle written by :func:`exports.bundle.write_bundle`.

    Raises:
        BundleError: the directory is not a bundle, a file is missing or tampered with, or the
            files disagree with each other (class count, embedding size, image size).
        InvalidModelError: the image encoder is not a loadable ONNX model.
    """
    directory = Path(directory)
    config = verify_bundle(directory)
    if config.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{directory / CONFIG}: not a {BUNDLE_FORMAT} config")
    classnames = read_json(directory / CLASSES)
    if not isinstance(classnames, list) or not classnames or not all(isinstance(c, str) for c in classnames):
        raise BundleError(f"{directory / CLASSES}: expected a non-empty JSON list of class names")
    if config.get("num_classes", len(classnames)) != len(classnames):
        raise BundleError(f"{directory / CONFIG}: num_classes is {config['num_classes']} but {CLASSES} holds "
                          f"{len(classnames)}")
    try:
        emb = np.load(directory / TEXT_EMBEDDINGS, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BundleError(f"{directory / TEXT_EMBEDDINGS}: unreadable ({exc})") from exc
    if emb.ndim != 2 or emb.shape[0] != len(classnames):
        raise BundleError(
            f"{directory / TEXT_EMBEDDINGS}: shape {emb.shape} does not match {len(classnames)} classes in {CLASSES}"
        )
    if emb.dtype.kind != "f" or not np.isfinite(emb).all():
        raise BundleError(f"{directory / TEXT_EMBEDDINGS}: expected finite floats, got {emb.dtype} with NaN/inf "
                          "or non-float values")
    try:
        transform = ImageTransform.from_dict(config["preprocess"])
        logit_scale = float(config["logit_scale"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{directory / CONFIG}: bad preprocess/logit_scale ({type(exc).__name__}: {exc})") from exc
    model_file = directory / config["image_encoder"]["file"]
    encoder = OnnxGraph(model_file, IMAGE_ENCODER, providers=providers, threads=threads, optimization=optimization)
    _check_encoder_shapes(encoder, transform, emb.shape[1])
    if config.get("embed_dim", emb.shape[1]) != emb.shape[1]:
        raise BundleError(f"{directory / CONFIG}: embed_dim is {config['embed_dim']} but {TEXT_EMBEDDINGS} holds "
                          f"{emb.shape[1]}-d rows")
    return BundleClassifier(
        image_encoder=encoder,
        classnames=list(classnames),
        text_embeddings=l2_normalize(emb.astype(np.float32)),
        logit_scale=logit_scale,
        transform=transform,
        config=config,
        path=directory,
    )


def image_io_mismatch(graph: OnnxGraph, image_shape: tuple[int, ...] | None,
                      embed_dim: int | None) -> tuple[str, list, tuple] | None:
    """Where an image encoder's fixed (integer) dimensions disagree with the pixels it will be fed,
    ``(C, H, W)``, or with the embedding size it must produce; symbolic dimensions fit anything.

    Returns:
        None when everything fits, else ``(what, the graph's shape, the expected shape)`` with
        ``what`` ``"input"`` (compare ``shape[1:]`` with ``image_shape``) or ``"output"``
        (compare ``shape[-1:]`` with ``(embed_dim,)``).
    """
    inputs = {i.name: i.shape for i in graph.session.get_inputs()}
    got_in = inputs[IMAGE_ENCODER.inputs[0].name]
    if image_shape is not None and not _dims_fit(got_in[1:], image_shape):
        return "input", got_in, tuple(image_shape)
    outputs = {o.name: o.shape for o in graph.session.get_outputs()}
    got_out = outputs.get(IMAGE_ENCODER.outputs[0].name, next(iter(outputs.values()), None))
    if embed_dim is not None and got_out is not None and not _dims_fit(got_out[-1:], (embed_dim,)):
        return "output", got_out, (embed_dim,)
    return None


def _dims_fit(got, want) -> bool:
    return len(got) == len(want) and all(not isinstance(g, int) or g == w for g, w in zip(got, want))


def _check_encoder_shapes(encoder: OnnxGraph, transform: ImageTransform, embed_dim: int) -> None:
    mismatch = image_io_mismatch(encoder, (3, *transform.output_size), embed_dim)
    if mismatch is None:
        return
    what, got, want = mismatch
    if what == "input":
        raise BundleError(
            f"{encoder.path}: expects pixel input {got[1:]} but the bundle's preprocessing produces {list(want)}"
        )
    raise BundleError(
        f"{encoder.path}: produces {got[-1]}-d embeddings but {TEXT_EMBEDDINGS} holds {embed_dim}-d class embeddings"
    )
