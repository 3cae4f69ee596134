"""Prompt templates from the command line or a suite: a named set, a ``{}`` template, or a JSON file.

A JSON file holds either a list of templates or, as CLIP_benchmark's
``en_zeroshot_classification_templates.json`` does, a map from dataset name to its list. Such a
map is read at ``FILE.json#KEY``, or, without ``#KEY``, at the dataset's own name. CLIP_benchmark
writes the class-name slot as ``{c}``; it becomes this project's ``{}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from clipcore.jsonfile import read_json
from clipcore.templates import TEMPLATE_SETS, get_templates


def dataset_key(data: str) -> str:
    """The name a template map is keyed by: ``../shared/data/cifar10`` and
    ``clip-benchmark/wds_cifar10`` both give ``cifar10``."""
    name = Path(data.rstrip("/")).name.lower()
    return name[len("wds_"):] if name.startswith("wds_") else name


def _normalise(template: object, where: str) -> str:
    if not isinstance(template, str):
        raise ValueError(f"{where}: template {template!r} is not a string")
    text = template.replace("{c}", "{}")
    if text.count("{}") != 1:
        raise ValueError(f"{where}: template {template!r} needs exactly one '{{}}' (or '{{c}}') class-name slot")
    try:
        text.format("x")
    except (IndexError, KeyError, ValueError) as exc:  # stray braces would break str.format later
        raise ValueError(f"{where}: template {template!r} is not a valid format string ({exc})") from None
    return text


def _from_json(spec: str, dataset: str | None) -> tuple[str, ...]:
    file, _, key = spec.partition("#")
    data = read_json(file, "template")
    if isinstance(data, dict):
        key = key or (dataset_key(dataset) if dataset else "")
        if not key:
            raise ValueError(f"{file} maps dataset names to templates; choose one with {file}#NAME")
        if key not in data:
            raise ValueError(f"{file} has no templates for {key!r}; it has {sorted(data)[:20]}"
                             f"{' ...' if len(data) > 20 else ''} (choose one with {file}#NAME)")
        data, file = data[key], f"{file}#{key}"
    elif key:
        raise ValueError(f"{file} is a list of templates, not a map: drop '#{key}'")
    if not isinstance(data, list) or not data:
        raise ValueError(f"{file}: expected a non-empty JSON list of templates (or a map of such lists)")
    return tuple(_normalise(t, file) for t in data)


def load_templates(spec: str | Sequence[str], dataset: str | None = None) -> tuple[str, ...]:
    """Templates from a named set (``openai_cifar``), one ``{}`` template, a list, or a JSON file.

    Args:
        spec: the set name, template, list of templates, or ``FILE.json`` / ``FILE.json#KEY``.
        dataset: the dataset a template map is looked up by when ``#KEY`` is not given.

    Raises:
        ValueError / FileNotFoundError: naming the file, key or template at fault.
    """
    if isinstance(spec, str):
        if spec in TEMPLATE_SETS:
            return TEMPLATE_SETS[spec]
        if spec.partition("#")[0].endswith(".json"):
            return _from_json(spec, dataset)
        return get_templates(spec)
    if not isinstance(spec, (list, tuple)) or not spec:
        raise ValueError(f"templates: expected a set name, a template, a JSON file or a non-empty list, got {spec!r}")
    return tuple(_normalise(t, "templates") for t in spec)
