"""Gates: the thresholds a variant must meet against the torch student, and their parsing."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from exports.parity.names import KNOWN_VARIANTS, TEXT_VARIANTS
from exports.report import format_metric

# gate comparisons: 0.95 - 0.94 must not count as a drop of more than 1 point, nor 0.245 - 0.235 computed from
# float32 accuracies (0.0100000203); fractions of at most a million images step by >= 1e-6
_EPS = 1e-7


class ParityInputError(ValueError):
    """Bad input to the parity report (unknown variant, unusable data); the CLI exits 2."""


# gate field -> (metric it bounds, comparison)
GATE_FIELDS = {
    "min_agreement": ("agreement_student", ">="),
    "max_emb_abs_diff": ("emb_max_abs_diff", "<="),
    "max_top1_drop": ("top1_drop", "<="),
    "min_emb_cosine": ("emb_cos_min", ">="),
    "max_kl": ("kl_student", "<="),
}


@dataclass(frozen=True)
class GateCheck:
    field: str
    metric: str
    op: str
    value: float | None
    threshold: float
    passed: bool

    def describe(self) -> str:
        """``agreement_student = 98.26 % < 99.00 % (gate min_agreement)``."""
        if self.value is None:
            return f"{self.metric} was not measured (gate {self.field} needs it)"
        if not math.isfinite(self.value):
            return f"{self.metric} = {self.value} is not finite (gate {self.field})"
        bad = {">=": "<", "<=": ">"}[self.op] if not self.passed else self.op
        return (f"{self.metric} = {format_metric(self.metric, self.value)} {bad} "
                f"{format_metric(self.metric, self.threshold)} (gate {self.field})")


@dataclass(frozen=True)
class Gate:
    """Thresholds a variant must meet against the torch student; None leaves a metric unchecked.

    Fractions, not percentages: ``min_agreement=0.995`` is 99.5 % top-1 agreement and
    ``max_top1_drop=0.01`` one accuracy point.
    """

    min_agreement: float | None = None
    max_emb_abs_diff: float | None = None
    max_top1_drop: float | None = None
    min_emb_cosine: float | None = None
    max_kl: float | None = None

    def check(self, metrics: Mapping[str, float | None]) -> list[GateCheck]:
        checks = []
        for name, (metric, op) in GATE_FIELDS.items():
            threshold = getattr(self, name)
            if threshold is None:
                continue
            value = metrics.get(metric)
            ok = (value is not None and math.isfinite(value)
                  and (value >= threshold - _EPS if op == ">=" else value <= threshold + _EPS))
            checks.append(GateCheck(name, metric, op, value, float(threshold), bool(ok)))
        return checks

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}


PIPELINE = "pipeline"  # the gate key (and family) of whole-pipeline rows
DEFAULT_GATES: dict[str, Gate] = {
    "fp32": Gate(min_agreement=1.0, max_emb_abs_diff=1e-4),
    "fp16": Gate(min_agreement=0.995),
    "int8": Gate(min_agreement=0.99, max_top1_drop=0.01),
    # the whole open-vocabulary pipeline (IMAGE+TEXT rows, exports.text_parity.pipeline_results): as int8
    PIPELINE: Gate(min_agreement=0.99, max_top1_drop=0.01),
}


def gate_family(precision: str) -> str:
    """``fp32``, ``fp16`` or ``int8`` (every int8-weight scheme, w8a16 included, shares a gate by default);
    ``pipeline`` for the ``IMAGE+TEXT`` precisions of whole-pipeline rows."""
    if "+" in precision:
        return PIPELINE
    return "int8" if precision.startswith("int8") or precision == "w8a16" else precision


def precision_from_name(name: str) -> str:
    """The precision an ``--onnx NAME=PATH`` file is reported and gated as: the one its name
    mentions (a bare ``int8`` counts as ``int8-dynamic``), else ``fp32``."""
    for precision in ("int8-static", "int8-dynamic", "w8a16", "fp16"):
        if precision in name:
            return precision
    return "int8-dynamic" if "int8" in name else "fp32"


def _gate_value(raw: Any, where: str) -> float | None:
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("none", "null", "off")):
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ParityInputError(f"{where}: {raw!r} is not a number (or 'none' to turn the check off)") from None
    if not math.isfinite(value) or value < 0:
        raise ParityInputError(f"{where}: {raw!r} must be a finite, non-negative number")
    return value


def _merge_gate(gates: dict[str, Gate], key: str, fields: Mapping[str, Any], where: str) -> None:
    unknown = set(fields) - set(GATE_FIELDS)
    if unknown:
        raise ParityInputError(f"{where}: unknown gate fields {sorted(unknown)}; expected {sorted(GATE_FIELDS)}")
    values = {name: _gate_value(raw, f"{where} {key}.{name}") for name, raw in fields.items()}
    gates[key] = replace(gates.get(key, Gate()), **values)


def load_gates(source: str | Path | Mapping[str, Mapping[str, Any]] | None = None,
               overrides: Iterable[str] = (), names: Iterable[str] = (), where: str = "gates") -> dict[str, Gate]:
    """:data:`DEFAULT_GATES`, updated from a mapping or a YAML/JSON file, then ``KEY.FIELD=VALUE`` overrides.

    A key is a variant name (``int8-static``, ``ort-trt-fp16``, ``text-int8``, one of ``names``) or a
    precision family (``fp32``, ``fp16``, ``int8``); the mapping (or file) maps keys to ``{field: value}``,
    e.g. a recipe's ``export.gates: {int8: {min_agreement: 0.98}}``.

    Args:
        names: further variant names a key may give (the CLI's ``--onnx NAME=PATH`` names).
        where: how a mapping ``source`` is named in errors (``export.gates``).

    Raises:
        ParityInputError: unreadable file, unknown key or field, or a value that is not a number.
    """
    gates = dict(DEFAULT_GATES)
    valid = gate_keys(names)
    if source is not None:
        where = where if isinstance(source, Mapping) else str(source)
        table = source if isinstance(source, Mapping) else _read_gate_file(Path(source))
        for key, fields in table.items():
            if not isinstance(fields, Mapping):
                raise ParityInputError(f"{where}: gate {key!r} must map fields to values, got {fields!r}")
            _check_key(str(key), valid, f"{where}: gate {key!r}")
            _merge_gate(gates, str(key), fields, where)
    for item in overrides:
        key, name, raw = split_gate_override(item)
        _check_key(key, valid, f"--gate {item}")
        _merge_gate(gates, key, {name: raw}, "--gate")
    return gates


GATE_FAMILIES = ("fp32", "fp16", "int8", PIPELINE)


def gate_keys(names: Iterable[str] = ()) -> tuple[str, ...]:
    """Every key a gate may have: the precision families, the built-in variants (image and text) and ``names``."""
    keys = (*GATE_FAMILIES, *KNOWN_VARIANTS, *TEXT_VARIANTS, *names)
    return tuple(dict.fromkeys(keys))


def _check_key(key: str, valid: Sequence[str], where: str) -> None:
    # a misspelt key would gate nothing and the run would pass unchecked
    if key not in valid:
        raise ParityInputError(f"{where}: unknown gate key {key!r}; expected a precision family or a variant "
                               f"name: {', '.join(valid)}")


def split_gate_override(item: str) -> tuple[str, str, str]:
    """``"int8.min_agreement=0.98"`` -> ``("int8", "min_agreement", "0.98")``.

    Raises:
        ParityInputError: not of the form KEY.FIELD=VALUE.
    """
    key_field, sep, raw = item.partition("=")
    key, dot, name = key_field.strip().rpartition(".")
    if not sep or not dot or not key:
        raise ParityInputError(f"--gate {item!r}: expected KEY.FIELD=VALUE, e.g. int8.min_agreement=0.98")
    return key, name, raw.strip()


def _read_gate_file(path: Path) -> dict:
    import yaml

    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ParityInputError(f"{path}: unreadable gates file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict):
        raise ParityInputError(f"{path}: a gates file maps variant names or fp32/fp16/int8 to thresholds")
    return data


def resolve_gate(gates: Mapping[str, Gate], name: str, precision: str) -> tuple[str, Gate] | None:
    """The gate for a variant: by its name, else by its precision family."""
    for key in (name, gate_family(precision)):
        if key in gates:
            return key, gates[key]
    return None
