"""New class names on the device: tokenizer + ONNX text encoder -> a zero-shot head, cached.

Open-vocabulary bundles (``write_bundle(..., text_encoder=True)``, ``export.bundle_text``) also
hold::

    text_encoder.onnx      input_ids, attention_mask -> L2-normalised text embeddings
    tokenizer.json         a ``tokenizers`` tokenizer with the model's truncation and padding set

This module needs onnxruntime, numpy and ``tokenizers`` only (no torch, no transformers):
:func:`classifier_for_classes` turns a loaded bundle into one over any class names, building the
head with OpenAI's recipe (every prompt embedded and normalised, averaged per class,
renormalised) and caching it on disk under a key of everything it is built from: the names, the
templates and the sha256 of the text encoder and of the tokenizer. A cached head is checked on
every read (shape, finite, unit rows) and rebuilt with a warning when it is not usable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

from clipcore.templates import check_template
from exports.interface import TEXT_ENCODER
from exports.runtime import MANIFEST, BundleClassifier, BundleError, OnnxGraph, l2_normalize

TOKENIZER_FILE = "tokenizer.json"
HEAD_CACHE_FORMAT = 2  # 2: keyed by the tokenizer too; heads are checked on every read
log = logging.getLogger("exports.text_runtime")
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clip-distill" / "heads"


class DeviceTokenizer:
    """``tokenizer.json`` run with the ``tokenizers`` library; truncation and padding come from the file."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        self.path = Path(path)
        try:
            self.tokenizer = Tokenizer.from_file(str(self.path))
        except Exception as exc:  # tokenizers raises its own Exception subclass for bad JSON
            raise BundleError(f"{self.path}: not a tokenizers file ({type(exc).__name__}: {exc})") from exc

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        encodings = self.tokenizer.encode_batch(list(texts))
        return {"input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64)}


def prompts_for(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    return [t.format(c) for c in classnames for t in templates]


def text_embeddings(encoder: OnnxGraph, tokenizer: DeviceTokenizer, texts: Sequence[str],
                    batch_size: int = 256) -> np.ndarray:
    """L2-normalised embeddings (N, D) of ``texts``, float32."""
    out = []
    name = TEXT_ENCODER.outputs[0].name
    for i in range(0, len(texts), batch_size):
        out.append(encoder.run(tokenizer(texts[i : i + batch_size]), [name])[name])
    return l2_normalize(np.concatenate(out).astype(np.float32))


def build_head(encoder: OnnxGraph, tokenizer: DeviceTokenizer, classnames: Sequence[str],
               templates: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """The (C, D) zero-shot head, unit rows, the same recipe as :func:`clipcore.zeroshot.build_classifier`."""
    emb = text_embeddings(encoder, tokenizer, prompts_for(classnames, templates), batch_size)
    emb = emb.astype(np.float64).reshape(len(classnames), len(templates), -1)
    return l2_normalize(emb.mean(axis=1)).astype(np.float32)


def head_key(classnames: Sequence[str], templates: Sequence[str], encoder_sha256: str, tokenizer_sha256: str) -> str:
    """The cache key of a head: every input it is built from (names, templates, the text encoder and
    the tokenizer, by the sha256 the bundle's manifest verified)."""
    payload = json.dumps({"format": HEAD_CACHE_FORMAT, "classnames": list(classnames), "templates": list(templates),
                          "text_encoder": encoder_sha256, "tokenizer": tokenizer_sha256}, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def cached_head_problem(head: np.ndarray, num_classes: int, embed_dim: int) -> str | None:
    """Why a head read from the cache cannot be used (None: it can): it must be (classes, dim)
    floats with finite, unit-length rows, as :func:`build_head` writes them."""
    if head.dtype.kind != "f" or head.shape != (num_classes, embed_dim):
        return f"{head.dtype} array of shape {head.shape}, expected float ({num_classes}, {embed_dim})"
    if not np.isfinite(head).all():
        return "it holds NaN or inf"
    norms = np.linalg.norm(head.astype(np.float64), axis=1)
    if not np.allclose(norms, 1.0, atol=1e-3):
        return f"its rows are not unit length (norms {norms.min():.3g} to {norms.max():.3g})"
    return None


def _read_cached_head(path: Path, num_classes: int, embed_dim: int) -> np.ndarray | None:
    """The cached head at ``path``, or None (with a warning) when it is absent, unreadable or wrong."""
    if not path.is_file():
        return None
    try:
        head = np.load(path, allow_pickle=False)
        problem = cached_head_problem(head, num_classes, embed_dim) if isinstance(head, np.ndarray) else "not an array"
    except (OSError, ValueError, EOFError) as exc:
        problem = f"unreadable ({type(exc).__name__}: {exc})"
    if problem is None:
        return head
    log.warning("head cache %s: %s; rebuilding it", path, problem)
    return None


def bundled_templates(clf: BundleClassifier) -> list[str]:
    """The templates the bundle's head was built with, each with exactly one ``{}``.

    Raises:
        BundleError: naming ``config.json`` and the template (a second slot would fail in ``str.format``).
    """
    templates = list(clf.config.get("templates") or ["{}"])
    _check_templates(templates, f"{clf.path / 'config.json'}: templates")
    return templates


def _check_templates(templates: Sequence[str], source: str) -> None:
    for i, template in enumerate(templates):
        try:
            check_template(template)
        except ValueError as exc:
            raise BundleError(f"{source}[{i}]: {exc}") from None


def classifier_for_classes(clf: BundleClassifier, classnames: Sequence[str], templates: Sequence[str] | None = None,
                           *, cache_dir: str | Path | None = DEFAULT_CACHE, threads: int | None = None) -> BundleClassifier:
    """``clf`` with its head replaced by one for ``classnames`` built by the bundle's text encoder.

    Args:
        templates: prompt templates with ``{}``; default the ones the bundled head was built with.
        cache_dir: where heads are kept between calls (None: no cache).

    Raises:
        BundleError: the bundle has no text encoder, the class names are empty or repeated, or a
            template has other than one ``{}`` (naming ``config.json`` or ``templates``).
    """
    text = clf.config.get("text_encoder")
    if not text or clf.path is None:
        raise BundleError(f"{clf.path}: this bundle has no text encoder (write it with text_encoder=True / "
                          "export.bundle_text=true); only its own classes can be used")
    names = [str(c).strip() for c in classnames]
    if not names or any(not n for n in names) or len(set(names)) != len(names):
        raise BundleError(f"class names must be non-empty and distinct, got {list(classnames)}")
    if templates:
        temps = list(templates)
        _check_templates(temps, "templates")
    else:
        temps = bundled_templates(clf)
    manifest = json.loads((clf.path / MANIFEST).read_text())["files"]
    key = head_key(names, temps, manifest[text["file"]]["sha256"], manifest[text["tokenizer"]]["sha256"])
    cached = Path(cache_dir) / f"{key}.npy" if cache_dir is not None else None
    head = None if cached is None else _read_cached_head(cached, len(names), clf.text_embeddings.shape[1])
    if head is None:
        encoder = OnnxGraph(clf.path / text["file"], TEXT_ENCODER, threads=threads)
        head = build_head(encoder, DeviceTokenizer(clf.path / text["tokenizer"]), names, temps)
        problem = cached_head_problem(head, len(names), clf.text_embeddings.shape[1])
        if problem is not None:  # e.g. a text encoder that gives NaN: neither used nor cached
            raise BundleError(f"{clf.path / text['file']}: the head it builds for {len(names)} class names is "
                              f"unusable: {problem}")
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".tmp-{os.getpid()}.npy")
            np.save(tmp, head, allow_pickle=False)
            tmp.replace(cached)  # atomic: a concurrent reader sees the whole file or none
    return replace(clf, classnames=names, text_embeddings=head)
