"""Class names for zero-shot heads: from a ClassLabel, a list, or a synonym map (wnid -> names)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from clipcore.jsonfile import read_json


def synonyms(entry: str | Sequence[str]) -> list[str]:
    """WordNet-style 'rocking chair, rocker' -> ['rocking chair', 'rocker']."""
    items = entry.split(",") if isinstance(entry, str) else list(entry)
    return [s.strip() for s in items if s.strip()]


def load_classname_source(spec: str) -> list[str] | dict[str, str | list[str]]:
    """A JSON file (list, or dict keyed by label name), or a comma-separated list of names."""
    path = Path(spec)
    if path.suffix == ".json" or path.is_file():
        data = read_json(path, "class-name")
        if not isinstance(data, (list, dict)) or not data:
            raise ValueError(f"{spec}: expected a non-empty JSON list or object of class names")
        return data
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ValueError("--classnames is empty")
    return names


def label_names_or_none(ds, label_column: str | None) -> list[str] | None:
    """ClassLabel names of ``label_column``, or None when it is absent or not a ClassLabel."""
    import datasets

    feature = ds.features.get(label_column) if label_column else None
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def classnames_for(ds, label_column: str | None, spec: str | None) -> list[str] | None:
    """Resolve ``--classnames``/``data.classnames`` against the dataset's labels (None: no names)."""
    source = load_classname_source(spec) if spec else None
    labels = label_names_or_none(ds, label_column)
    if source is None and labels is None:
        return None
    return resolve_classnames(labels, source)


def resolve_classnames(
    label_names: Sequence[str] | None, source: list[str] | Mapping[str, str | list[str]] | None = None
) -> list[str]:
    """Human-readable class names in label order.

    ``source`` may replace the names (a list of the same length) or map each label name
    (e.g. a Tiny-ImageNet wnid) to its synonyms, of which the first is used.
    """
    if source is None:
        if not label_names:
            raise ValueError("no class names: the label column is not a ClassLabel; pass --classnames")
        return list(label_names)
    if isinstance(source, Mapping):
        if not label_names:
            raise ValueError("a class-name mapping needs ClassLabel names to map from")
        missing = [n for n in label_names if n not in source]
        if missing:
            raise ValueError(f"class-name mapping lacks {len(missing)} labels, e.g. {missing[:5]}")
        return [synonyms(source[n])[0] for n in label_names]
    names = list(source)
    if label_names is not None and len(names) != len(label_names):
        raise ValueError(f"{len(names)} class names given but the dataset has {len(label_names)} classes")
    return names
