"""Image-only training data for general students: a mixture of datasets and a large vocabulary.

``data.train`` may list several datasets (each with its split and limit); their images are trained
on as one set and their labels are never read. The text side is a vocabulary (``data.vocabulary``:
e.g. the 1,000 ImageNet names and the 200 WordNet names of Tiny-ImageNet) rather than the training
labels, so the class KL and the in-batch affinity KL teach the student the teacher's embedding space
over many concepts, not one label set.

Teacher targets are computed and cached per source, under the source's own dataset fingerprint, so
a source the teacher was built on (Tiny-ImageNet train for the zero-shot reference teacher) reuses
the tower features that build cached; the vocabulary's teacher text embeddings are cached as well.
``data.mosaics`` adds scene-like frames of the sources' own images as one more source
(:mod:`distill.mosaics`).
"""

from __future__ import annotations

import dataclasses
import logging

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from clipcore.augment import RowViews, SourceViews, ViewSpec
from clipcore.cache import TeacherTargetCache, cache_key, texts_sha
from clipcore.classnames import load_classname_source, synonyms
from clipcore.data import Columns, DataSpec, ImageDataset, flatten_captions, load_hf_dataset, resolve_columns
from clipcore.distill_loss import LossConfig
from clipcore.dual_encoder import DualEncoder
from clipcore.templates import get_templates
from distill import mosaics
from distill.config import CacheConfig, ConfigError, DataConfig, TrainSource
from distill.features import embed_texts, teacher_image_rows, teacher_tower_features
from distill.task import TextBank
from distill.train_data import TrainData, TrainRows, check_path, check_true_pairs

log = logging.getLogger("distill.train")
IMAGE = "image"


def vocabulary_names(sources: list[str]) -> list[str]:
    """The union of the class names of several sources, in order, duplicates (any case) dropped.

    A source is a JSON list, a JSON map whose values are names or synonym lists (the first synonym
    is used: ``"rocking chair, rocker"`` -> ``"rocking chair"``), or a comma-separated list.
    """
    names, seen = [], set()
    for spec in sources:
        data = load_classname_source(spec)
        values = data.values() if isinstance(data, dict) else data
        for value in values:
            parts = synonyms(value) if isinstance(value, (str, list)) else []
            if not parts:
                raise ValueError(f"vocabulary source {spec}: entry {value!r} holds no class name")
            if parts[0].lower() not in seen:
                seen.add(parts[0].lower())
                names.append(parts[0])
    if not names:
        raise ValueError("data.vocabulary holds no class names")
    return names


def load_sources(data: DataConfig, seed: int) -> list[tuple[datasets.Dataset, str]]:
    """Each source's rows (limit = a seeded subset) and its image column (its caption column, when
    ``data.train[i].caption_column`` names one, is checked here, before any image is embedded).

    The datasets are returned as loaded: their fingerprints key the teacher-target caches, so a
    source the teacher was aligned on finds the tower features of that run.
    """
    out = []
    for i, src in enumerate(data.sources()):
        check_path(src.path, f"data.train[{i}].path")
        spec = DataSpec(path=src.path, split=src.split, image_column=data.image_column, limit=src.limit,
                        shuffle_seed=seed if src.limit else None)
        ds = load_hf_dataset(spec)
        if src.caption_column and src.caption_column not in ds.column_names:
            raise ConfigError(f"data.train[{i}].caption_column={src.caption_column!r}: {spec.label} has no such "
                              f"column (columns: {', '.join(ds.column_names)})")
        out.append((ds, resolve_columns(ds, spec).image))
        times = f", each {src.repeat} times per epoch" if src.repeat > 1 else ""
        times += f", {src.views} fixed views each (view 0 plain, then crops)" if src.views > 1 else ""
        log.info("training source %d: %s, %d images%s (labels unused)", i, spec.label, len(ds), times)
    return out


def images_only(ds: datasets.Dataset, column: str) -> datasets.Dataset:
    """The image column alone, named ``image``, so that sources concatenate."""
    ds = ds.select_columns([column])
    return ds.rename_column(column, IMAGE) if column != IMAGE else ds


def _source_targets(cache: CacheConfig, teacher: DualEncoder, ds: datasets.Dataset, column: str, accelerator,
                    *, views: ViewSpec, batch_size: int) -> torch.Tensor:
    """(K * rows, 1, D) teacher image targets of one source, from its own cache entry: its K views
    (``data.train[i].views``) laid out view-major, as :class:`clipcore.augment.RowViews` reads them."""
    rows = teacher_image_rows(teacher, ds, Columns(image=column), views, cache.dir, views.seed, batch_size, accelerator)
    key = cache_key(f"{teacher.fingerprint()}/images-only{views.cache_tag}", ds._fingerprint,
                    teacher.image_transform.to_json(), views.views, views.seed)
    store = TeacherTargetCache(cache.dir, key, accelerator.process_index, accelerator.num_processes,
                               accelerator.wait_for_everyone)
    targets = store.get_or_build(len(ds), rows)
    log.info("teacher-target cache %s: %s", "hit" if targets.hit else "built", targets.path)
    return _view_major(torch.from_numpy(targets.images))


def _view_major(per_row: torch.Tensor) -> torch.Tensor:
    """(rows, K, F) -> (K * rows, 1, F): each view a row of its own, as :class:`clipcore.augment.RowViews` reads them."""
    return per_row.transpose(0, 1).reshape(-1, 1, per_row.shape[-1])


def _source_towers(cache: CacheConfig, teacher: DualEncoder, ds: datasets.Dataset, column: str, accelerator,
                   *, views: ViewSpec, batch_size: int) -> torch.Tensor:
    """(K * rows, 1, F) the teacher's frozen image-tower features of one source, laid out as
    :func:`_source_targets` lays out its targets (``loss.tower_weight``)."""
    return _view_major(teacher_tower_features(teacher, ds, Columns(image=column), views, cache.dir, views.seed,
                                              batch_size, accelerator))


def _text_targets(cache: CacheConfig, teacher: DualEncoder, texts: list[str], accelerator) -> torch.Tensor:
    embed = lambda t: embed_texts(teacher, t).numpy()  # noqa: E731
    if not cache.enabled:
        return torch.from_numpy(embed(texts))
    key = cache_key(f"{teacher.fingerprint()}/texts", texts_sha(texts), "", 1, 0)
    store = TeacherTargetCache(cache.dir, key, accelerator.process_index, accelerator.num_processes,
                               accelerator.wait_for_everyone)
    return torch.from_numpy(store.get_or_build(0, lambda s, e: np.zeros((e - s, 1, 0), np.float32), texts,
                                               embed).texts)


def class_head_from_bank(bank: TextBank) -> torch.Tensor:
    """The zero-shot head of :func:`distill.zeroshot.build_classifier` from the bank's cached prompt
    embeddings: per class, normalise each prompt embedding, average, renormalise."""
    emb = bank.teacher_emb[bank.prompt_rows].float()  # (C, T, D)
    return F.normalize(F.normalize(emb, dim=-1).mean(dim=1), dim=-1)


def source_captions(parts: list[tuple[datasets.Dataset, str]], sources: list[TrainSource]
                    ) -> tuple[list[str], list[list[int]], list[list[int]]]:
    """The captions of every source that names a ``caption_column`` (each once, whatever its repeat); for every row
    of the mixture, repeats included, the indices of its own captions among them as its affinity texts (``[]``: a
    row without captions, or of a source with ``caption_affinity: false``, which takes a vocabulary prompt as its
    affinity text); and the indices of its own captions whatever ``caption_affinity`` says."""
    texts, rows, owned = [], [], []
    for (ds, _), src in zip(parts, sources):
        own: list[list[int]] = [[] for _ in range(len(ds))]
        if src.caption_column:
            caps, owner = flatten_captions(ds, src.caption_column)
            for j, row in enumerate(owner):
                own[row].append(len(texts) + j)
            texts += caps
        copies = src.views * src.repeat
        owned += own * copies
        rows += (own if src.caption_affinity else [[] for _ in own]) * copies
    return texts, rows, owned


def build_vocabulary_bank(data: DataConfig, cache: CacheConfig, teacher: DualEncoder, student: DualEncoder,
                          accelerator, captions: tuple[list[str], list[list[int]], list[list[int]]] = ([], [], [])
                          ) -> tuple[TextBank, list[str]]:
    """Prompts of every vocabulary name x template, then the sources' captions (:func:`source_captions`),
    with cached teacher embeddings."""
    if not data.vocabulary:
        raise ConfigError("a list of data.train sources trains on images only: set data.vocabulary "
                          "(class-name files) for the class and affinity targets")
    names = vocabulary_names(data.vocabulary)
    templates = list(get_templates(data.vocabulary_templates or data.templates))
    texts = [t.format(c) for c in names for t in templates]
    prompts, (caption_texts, caption_rows, owned) = len(texts), captions
    texts += caption_texts
    caption_rows = [[prompts + j for j in row] for row in caption_rows] if caption_texts else []
    owned = [[prompts + j for j in row] for row in owned] if caption_texts else []
    teacher_text = _text_targets(cache, teacher, texts, accelerator)
    ids = mask = None
    if student.has_own_text_tower:
        tokens = student.tokenize(texts)
        ids, mask = tokens["input_ids"], tokens.get("attention_mask", torch.ones_like(tokens["input_ids"]))
    prompt_rows = torch.arange(prompts).view(len(names), len(templates))
    log.info("vocabulary: %d class names x %d templates = %d prompts; %d captions", len(names), len(templates),
             prompts, len(caption_texts))
    return TextBank(texts, ids, mask, teacher_text, prompt_rows, caption_rows, owned), names


def build_mixture_data(data: DataConfig, cache: CacheConfig, teacher: DualEncoder, student: DualEncoder,
                       accelerator, *, seed: int, batch_size: int, tower_targets: bool = False,
                       loss: LossConfig | None = None) -> TrainData:
    """:class:`distill.train_data.TrainData` for image-only training on ``data.train``'s sources
    (``tower_targets``: with the teacher's frozen image-tower features of every row, for ``loss.tower_weight``;
    ``loss``: its pair losses need a caption on every row, checked before any image is embedded)."""
    parts = load_sources(data, seed)
    if data.mosaics.count:
        parts.append(mosaics.get_or_build(parts, data.mosaics, seed, accelerator))
    sources = data.sources() + [TrainSource()] * (len(parts) - len(data.sources()))  # + mosaics: no captions
    captions = source_captions(parts, sources)
    if loss is not None:
        check_true_pairs(loss, captions[1], "data.train (" + ", ".join(src.path for src in sources if src.path) + ")")
    bank, names = build_vocabulary_bank(data, cache, teacher, student, accelerator, captions)
    layout = RowViews([SourceViews(len(ds), ViewSpec(views=src.views, seed=seed), src.repeat)
                       for (ds, _), src in zip(parts, sources)])

    def per_row(per_source) -> torch.Tensor:
        # the student's views (layout) are never reduced; the teacher's are where a source asks (teacher_side)
        return torch.cat([per_source(cache, teacher, ds, col, accelerator, batch_size=batch_size,
                                     views=dataclasses.replace(seg.views, reduce_to=src.teacher_side or 0))
                          .repeat(seg.repeat, 1, 1) for (ds, col), seg, src in zip(parts, layout.segments, sources)])

    cached = per_row(_source_targets) if cache.enabled else None
    towers = per_row(_source_towers) if tower_targets else None
    copies = [seg.views.views * seg.repeat for seg in layout.segments]
    parts = [datasets.concatenate_datasets([images_only(ds, col)] * c) if c > 1 else images_only(ds, col)
             for (ds, col), c in zip(parts, copies)]
    ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    transforms = {"student": student.image_transform}
    if cached is None:
        transforms["teacher"] = teacher.image_transform
    # every view is a row of its own, so the loop's per-epoch view draw (cache.views) stays at view 0
    view = layout if any(seg.views.views > 1 for seg in layout.segments) else None
    images = ImageDataset(ds, transforms, Columns(image=IMAGE), name="data.train", view=view)
    rows = TrainRows(len(ds), ViewSpec(views=1, seed=seed), images)
    return TrainData(rows, bank, names, cached, None, class_head=class_head_from_bank(bank), teacher_towers=towers,
                     student_lowres=per_row_lowres(data, sources, [len(p) for p in parts]))


def per_row_lowres(data: DataConfig, sources: list[TrainSource], rows: list[int]) -> torch.Tensor | None:
    """Each training row's share of low-resolution student copies (``rows``: the rows of each source, copies
    included), or None when no source sets its own ``student_lowres`` (data.student_lowres applies to all)."""
    if all(src.student_lowres is None for src in sources):
        return None
    shares = [data.student_lowres if src.student_lowres is None else src.student_lowres for src in sources]
    return torch.cat([torch.full((n,), p) for p, n in zip(shares, rows)])
