"""The schema of a bundle's ``manifest.json`` and ``config.json``: types and bounds of every field.

A bundle whose hashes match its manifest can still say nonsense (a ``version`` of "abc", a
``logit_scale`` of NaN, a 60,000-pixel resize that allocates gigabytes); the hashes only prove the
files are the ones the manifest lists. :func:`check` walks a parsed JSON document against a schema
made of the small validators below and raises :class:`SchemaError` naming the first bad field
(``preprocess.size: 60000 is outside [1, 4096]``).

Hand-written rather than jsonschema or pydantic: the edge runtime promises to need only
onnxruntime, numpy and pillow, and this schema is a few dozen lines.
"""

from __future__ import annotations

import math
import re
from pathlib import PurePosixPath
from typing import Any, Callable, Mapping

Validator = Callable[[Any, str], None]

FORMAT = "clip-distill-zeroshot-bundle"
PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8-static", "w8a16")  # concrete schemes (exports.precision)
RESAMPLE = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
MAX_SIDE = 4096  # pixels: far above any CLIP input, far below a resize that exhausts memory


class SchemaError(ValueError):
    """A field of a bundle JSON file has the wrong type or is out of bounds; the message names it."""


def _fail(where: str, message: str) -> None:
    raise SchemaError(f"{where}: {message}" if where else message)


def integer(lo: int, hi: int) -> Validator:
    def check_int(value: Any, where: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(where, f"{value!r} is not an integer")
        if not lo <= value <= hi:
            _fail(where, f"{value} is outside [{lo}, {hi}]")
    return check_int


def number(lo: float, hi: float, lo_open: bool = False) -> Validator:
    def check_number(value: Any, where: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(where, f"{value!r} is not a number")
        if not math.isfinite(value):
            _fail(where, f"{value} is not a finite number")
        if value < lo or value > hi or (lo_open and value == lo):
            _fail(where, f"{value} is outside {'(' if lo_open else '['}{lo:g}, {hi:g}]")
    return check_number


def string(choices: tuple[str, ...] | None = None, max_len: int = 4096) -> Validator:
    def check_string(value: Any, where: str) -> None:
        if not isinstance(value, str):
            _fail(where, f"{value!r} is not a string")
        if choices is not None and value not in choices:
            _fail(where, f"{value!r} is not one of {list(choices)}")
        if len(value) > max_len:
            _fail(where, f"a string of {len(value)} characters (at most {max_len})")
    return check_string


def bundle_file(value: Any, where: str) -> None:
    """A plain relative file name inside the bundle directory."""
    string()(value, where)
    path = PurePosixPath(value)
    if not value or path.is_absolute() or ".." in path.parts or "\\" in value:
        _fail(where, f"{value!r} points outside the bundle")


def sha256_hex(value: Any, where: str) -> None:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
        _fail(where, f"{value!r} is not a sha256 hex digest")


def list_of(item: Validator, length: int | None = None, min_len: int = 0, max_len: int = 100_000) -> Validator:
    def check_list(value: Any, where: str) -> None:
        if not isinstance(value, list):
            _fail(where, f"expected a list, got {type(value).__name__}")
        if length is not None and len(value) != length:
            _fail(where, f"expected {length} items, got {len(value)}")
        if not min_len <= len(value) <= max_len:
            _fail(where, f"expected {min_len} to {max_len} items, got {len(value)}")
        for i, v in enumerate(value):
            item(v, f"{where}[{i}]")
    return check_list


def one_of(*options: Validator) -> Validator:
    """The first option's error is reported when none fits."""
    def check_any(value: Any, where: str) -> None:
        errors = []
        for option in options:
            try:
                option(value, where)
                return
            except SchemaError as exc:
                errors.append(str(exc))
        raise SchemaError(errors[0])
    return check_any


def optional(inner: Validator) -> Validator:
    def check_optional(value: Any, where: str) -> None:
        if value is not None:
            inner(value, where)
    return check_optional


def obj(fields: Mapping[str, Validator], required: tuple[str, ...] = (), extra: bool = True) -> Validator:
    """A JSON object: ``required`` keys present, every known key valid, unknown keys only if ``extra``."""
    def check_obj(value: Any, where: str) -> None:
        if not isinstance(value, dict):
            _fail(where, f"expected an object, got {type(value).__name__}")
        prefix = f"{where}." if where else ""
        missing = [k for k in required if k not in value]
        if missing:
            _fail(where, f"missing {missing}")
        unknown = sorted(set(value) - set(fields))
        if unknown and not extra:
            _fail(where, f"unknown keys {unknown}; expected some of {sorted(fields)}")
        for key, validator in fields.items():
            if key in value:
                validator(value[key], prefix + key)
    return check_obj


def map_of(item: Validator, key: Validator, min_len: int = 1) -> Validator:
    def check_map(value: Any, where: str) -> None:
        if not isinstance(value, dict):
            _fail(where, f"expected an object, got {type(value).__name__}")
        if len(value) < min_len:
            _fail(where, "is empty")
        for k, v in value.items():
            key(k, f"{where}.{k}")
            item(v, f"{where}.{k}")
    return check_map


SIDE = integer(1, MAX_SIDE)

PREPROCESS = obj({
    "size": one_of(SIDE, list_of(SIDE, length=2)),
    "crop_size": optional(list_of(SIDE, length=2)),
    "mean": list_of(number(-1e3, 1e3), length=3),
    "std": list_of(number(0.0, 1e3, lo_open=True), length=3),
    "resample": string(RESAMPLE),
    "rescale_factor": number(0.0, 1e3, lo_open=True),
}, required=("size", "mean", "std"), extra=False)

CONFIG = obj({
    "format": string((FORMAT,)),
    "version": integer(1, 1),
    "model": string(),
    "fingerprint": string(),
    "precision": string(PRECISIONS),
    # CLIP clamps its learned scale at 100; 0 or less would flatten or invert every probability
    "logit_scale": number(0.0, 1e4, lo_open=True),
    "embed_dim": integer(1, 65536),
    "num_classes": integer(1, 10_000_000),
    "templates": list_of(string(), min_len=1),
    "preprocess": PREPROCESS,
    "image_encoder": obj({
        "file": bundle_file,
        "inputs": list_of(string(), min_len=1),
        "outputs": list_of(string(), min_len=1),
        "opset": integer(1, 1000),
    }, required=("file",)),
    "created_with": map_of(string(), string(), min_len=0),
    # bundles built from a parity run (exports.gated_bundle): the gated variant and its certificate
    "variant": optional(string()),
    "certificate": optional(bundle_file),
    # open-vocabulary bundles (exports.text_runtime)
    "text_encoder": optional(obj({
        "file": bundle_file,
        "tokenizer": bundle_file,
        "precision": string(PRECISIONS),
        "source": optional(string()),
        "inputs": list_of(string(), min_len=1),
        "outputs": list_of(string(), min_len=1),
        "variant": optional(string()),
    }, required=("file", "tokenizer", "precision"))),
}, required=("format", "version", "precision", "logit_scale", "preprocess", "image_encoder"))

MANIFEST = obj({
    "format": string((FORMAT,)),
    "version": integer(1, 10**6),  # a newer version gets its own message from the runtime
    "files": map_of(obj({"sha256": sha256_hex, "bytes": integer(0, 2**50)}, required=("sha256", "bytes")),
                    bundle_file),
}, required=("format", "version", "files"))


def check(document: Any, schema: Validator, kind: str = "a JSON object") -> None:
    """Raise :class:`SchemaError` for the first field of ``document`` that ``schema`` refuses."""
    if not isinstance(document, dict):
        raise SchemaError(f"expected {kind}, got a {type(document).__name__}")
    schema(document, "")
