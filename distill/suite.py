"""Zero-shot benchmark suites: a YAML list of datasets, parsed and checked before any image is embedded.

One entry::

    - name: tiny-imagenet                 # unique; the column of the results table
      data: ../shared/data/tiny-imagenet  # hub id, parquet directory or image folder
      split: validation
      task: zeroshot                      # zeroshot | retrieval
      classnames: ../shared/data/tiny-imagenet/words.json   # ClassLabel when absent
      templates: openai_cifar             # a named set, a '{}' template, a list, or FILE.json[#KEY]
      limit: 2000                         # a seeded random subset of this many images (all when absent)
      metric: top1                        # top1 | top5 | mean_per_class_recall;
                                          # retrieval: image_to_text_R@{1,5,10} | text_to_image_R@{1,5,10}

``classnames`` is a JSON list, a JSON map from label name to synonyms (WordNet's ``words.json``), a
comma list, an inline YAML list, or ``FILE.json#KEY`` for CLIP_benchmark's ``en_classnames.json``
(dataset -> names). ``image_column``, ``label_column``, ``caption_column`` and ``where`` (rows whose
columns equal these values) are passed to :class:`clipcore.data.DataSpec`. Relative paths are
relative to the working directory, as in training recipes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import datasets
import yaml

from clipcore.classnames import label_names_or_none, load_classname_source, resolve_classnames
from clipcore.data import Columns, DataSpec, flatten_captions, load_hf_dataset, resolve_columns
from clipcore.prompts import load_templates
from clipcore.zeroshot import validate_classnames

TASKS = ("zeroshot", "retrieval")
ZEROSHOT_METRICS = ("top1", "top5", "mean_per_class_recall")
RETRIEVAL_METRICS = tuple(f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10))
DEFAULT_METRIC = {"zeroshot": "top1", "retrieval": "image_to_text_R@5"}
KEYS = ("name", "data", "split", "task", "classnames", "templates", "limit", "metric", "image_column",
        "label_column", "caption_column", "where", "seed")


class SuiteError(ValueError):
    """A suite file or entry is invalid; the message names the file, the entry and the key."""


@dataclass(frozen=True)
class SuiteEntry:
    name: str
    data: str
    split: str | None = None
    task: str = "zeroshot"
    classnames: str | list[str] | None = None
    templates: str | list[str] = "openai_cifar"
    limit: int | None = None
    metric: str = ""
    image_column: str | None = None
    label_column: str | None = None
    caption_column: str | None = None
    where: Mapping[str, Any] | None = None
    seed: int = 0

    def spec(self, limit: int | None = None) -> DataSpec:
        """The dataset part; ``limit`` caps the entry's own (a quick run over every dataset)."""
        cap = min(x for x in (self.limit, limit) if x is not None) if (self.limit or limit) else None
        return DataSpec(path=self.data, split=self.split, image_column=self.image_column,
                        label_column=self.label_column, caption_column=self.caption_column, limit=cap,
                        shuffle_seed=self.seed if cap else None, where=self.where)


@dataclass
class PreparedEntry:
    """An entry whose dataset is loaded and whose class names, templates and captions are checked."""

    entry: SuiteEntry
    ds: datasets.Dataset
    columns: Columns
    classnames: list[str] | None = None
    templates: tuple[str, ...] = ()
    texts: list[str] = field(default_factory=list)  # retrieval captions
    text_to_image: list[int] = field(default_factory=list)


def _where(source: str, index: int, raw: Mapping) -> str:
    name = raw.get("name") if isinstance(raw, Mapping) else None
    return f"{source} entry {index + 1}" + (f" ({name})" if name else "")


def _parse_entry(raw: Any, where: str) -> SuiteEntry:
    if not isinstance(raw, Mapping):
        raise SuiteError(f"{where}: expected a mapping with name, data, ...; got {raw!r}")
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise SuiteError(f"{where}: unknown key(s) {unknown}; valid keys: {list(KEYS)}")
    for key in ("name", "data"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise SuiteError(f"{where}: '{key}' must be a non-empty string, got {raw.get(key)!r}")
    task = raw.get("task", "zeroshot")
    if task not in TASKS:
        raise SuiteError(f"{where}: task={task!r}; expected one of {list(TASKS)}")
    metric = raw.get("metric", DEFAULT_METRIC[task])
    valid = ZEROSHOT_METRICS if task == "zeroshot" else RETRIEVAL_METRICS
    if metric not in valid:
        raise SuiteError(f"{where}: metric={metric!r} for task {task}; expected one of {list(valid)}")
    limit = raw.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise SuiteError(f"{where}: limit={limit!r}; expected a positive number of images")
    if task == "retrieval":
        extra = [k for k in ("classnames", "templates") if k in raw]
        if extra:
            raise SuiteError(f"{where}: {extra} apply to zero-shot entries only (task is retrieval)")
    classnames = raw.get("classnames")
    if classnames is not None and not isinstance(classnames, (str, list)):
        raise SuiteError(f"{where}: classnames must be a file, a comma list or a list, got {classnames!r}")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise SuiteError(f"{where}: seed={seed!r}; expected an integer in [0, 2**32)")
    where_rows = raw.get("where")
    if where_rows is not None and not isinstance(where_rows, Mapping):
        raise SuiteError(f"{where}: 'where' must map column names to values, got {where_rows!r}")
    return SuiteEntry(name=raw["name"], data=raw["data"], split=raw.get("split"), task=task, classnames=classnames,
                      templates=raw.get("templates", "openai_cifar"), limit=limit, metric=metric,
                      image_column=raw.get("image_column"), label_column=raw.get("label_column"),
                      caption_column=raw.get("caption_column"), where=where_rows, seed=seed)


def parse_suite(data: Any, source: str = "suite") -> list[SuiteEntry]:
    """Entries from a parsed YAML document (a list of mappings); every error names the entry."""
    if not isinstance(data, list) or not data:
        raise SuiteError(f"{source}: a suite is a non-empty YAML list of datasets, got {type(data).__name__}")
    entries = [_parse_entry(raw, _where(source, i, raw)) for i, raw in enumerate(data)]
    seen: set[str] = set()
    for entry in entries:
        if entry.name in seen:
            raise SuiteError(f"{source}: two entries are named {entry.name!r}; names must be unique")
        seen.add(entry.name)
    return entries


def load_suite(path: str | Path) -> list[SuiteEntry]:
    """Read and parse a suite file."""
    p = Path(path)
    if not p.is_file():
        raise SuiteError(f"suite file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise SuiteError(f"{p}: invalid YAML ({exc})") from exc
    return parse_suite(data, str(p))


def _classname_source(spec: str | list[str]):
    if isinstance(spec, list):
        return [str(n) for n in spec]
    file, _, key = spec.partition("#")
    if not key:
        return load_classname_source(spec)
    data = load_classname_source(file)  # CLIP_benchmark's en_classnames.json: dataset -> names
    if not isinstance(data, dict) or key not in data:
        raise ValueError(f"{file} has no class names for {key!r}")
    return data[key]


def entry_classnames(entry: SuiteEntry, ds: datasets.Dataset, columns: Columns) -> list[str]:
    """Class names in label order, checked against the dataset's labels."""
    if not columns.label:
        raise ValueError(f"zero-shot needs a label column; columns: {ds.column_names} (set label_column)")
    labels = label_names_or_none(ds, columns.label)
    if entry.classnames is None and labels is None:
        raise ValueError(f"label column {columns.label!r} is not a ClassLabel: give classnames")
    source = None if entry.classnames is None else _classname_source(entry.classnames)
    # an evaluation: standard lists (ImageNet-1k's) repeat names; warned about once, here
    names = validate_classnames(resolve_classnames(labels, source), allow_duplicates=True,
                                source=f"suite entry {entry.name!r}")
    top = max((v for v in ds[columns.label] if v is not None), default=-1)
    if top >= len(names):
        raise ValueError(f"labels go up to {top} but there are only {len(names)} class names")
    return names


def prepare_entry(entry: SuiteEntry, limit: int | None = None) -> PreparedEntry:
    """Load the entry's dataset (no image is decoded) and check its class names, templates and captions."""
    label = f"suite entry {entry.name!r}"
    try:
        spec = entry.spec(limit)
        ds = load_hf_dataset(spec)
        cols = resolve_columns(ds, spec)
        out = PreparedEntry(entry, ds, cols)
        if entry.task == "zeroshot":
            out.classnames = entry_classnames(entry, ds, cols)
            # a CLIP_benchmark template map is looked up by the entry's name unless FILE.json#KEY says otherwise
            out.templates = load_templates(entry.templates, dataset=entry.name)
        else:
            if not cols.captions:
                raise ValueError(f"retrieval needs a caption column; columns: {ds.column_names} (set caption_column)")
            out.texts, out.text_to_image = flatten_captions(ds, cols.captions)
            if not out.texts:
                raise ValueError("retrieval: no non-empty captions")
        return out
    except (ValueError, OSError, KeyError) as exc:
        raise SuiteError(f"{label} ({entry.data}): {exc}") from exc


def prepare_suite(entries: list[SuiteEntry], limit: int | None = None) -> list[PreparedEntry]:
    """Prepare every entry; the first bad one raises before any model runs."""
    return [prepare_entry(e, limit) for e in entries]


def describe(prepared: PreparedEntry) -> dict:
    """The JSON description of one dataset of a benchmark report."""
    e = prepared.entry
    out = {"name": e.name, "data": e.data, "split": e.split, "task": e.task, "metric": e.metric,
           "limit": e.limit, "num_rows": len(prepared.ds)}
    if e.task == "zeroshot":
        out.update(num_classes=len(prepared.classnames or []), num_templates=len(prepared.templates),
                   templates=e.templates if isinstance(e.templates, str) else "inline",
                   classnames=e.classnames if isinstance(e.classnames, str) or e.classnames is None else "inline")
    else:
        out.update(num_texts=len(prepared.texts))
    return out
