"""Features a training run computes once and caches: teacher targets and frozen-tower features.

Both training modes build their cached image features with one row builder,
:func:`encode_rows` (every augmented view of every row, through one model function), and store
them in :class:`clipcore.cache.TeacherTargetCache`:

* distill mode: the teacher's normalised image embeddings (:func:`teacher_image_rows`); a
  teacher built on frozen towers (:class:`TowerDualEncoder`) takes its heads to the cached tower
  features instead, which the run that aligned it on the same images has usually computed already;
* contrastive mode: the frozen towers' features (:func:`cached_image_tower_features`,
  :func:`cached_text_tower_features`), so each step runs only the heads.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from clipcore.augment import ViewSpec
from clipcore.cache import TeacherTargetCache, cache_key, texts_sha
from clipcore.data import ImageDataset, collate
from clipcore.dual_encoder import DualEncoder, TowerSplit, module_fingerprint
from clipcore.towers import TowerDualEncoder

log = logging.getLogger("distill.train")

RowBuilder = Callable[[int, int], np.ndarray]


def encode_rows(ds, cols, views: ViewSpec, transform, encode: Callable[[torch.Tensor], torch.Tensor],
                batch_size: int, device, desc: str, dim: int | None = None) -> RowBuilder:
    """``(start, end) -> (rows, K, F)`` float32: ``encode(pixels)`` of every view of those rows.

    Rows that fail to decode stay zero. ``dim`` sizes the output when no row of a shard decodes.
    """

    @torch.no_grad()  # here, not on the outer function: this closure runs later, outside it
    def embed(start: int, end: int) -> np.ndarray:
        out = None if dim is None else torch.zeros(end - start, views.views, dim)
        for k in range(views.views):
            view = (lambda image, i, k=k: views.apply(image, start + i, k)) if k or views.changes_view0 else None
            sub = ImageDataset(ds.select(range(start, end)), {"x": transform}, cols, view=view)
            batches = DataLoader(sub, batch_size=batch_size, collate_fn=collate)
            for batch in tqdm(batches, desc=f"{desc}, view {k + 1}/{views.views}", unit="batch",
                              mininterval=10, leave=False):
                if not batch["index"].numel():
                    continue
                feats = encode(batch["pixel_values_x"].to(device)).float().cpu()
                if out is None:
                    out = torch.zeros(end - start, views.views, feats.shape[1])
                out[batch["index"], k] = feats
        if out is None:
            raise ValueError(f"rows {start}..{end - 1}: no image could be decoded")
        return out.numpy()

    return embed


def _store(cache_dir: str, key: str, accelerator) -> TeacherTargetCache:
    return TeacherTargetCache(cache_dir, key, accelerator.process_index, accelerator.num_processes,
                              accelerator.wait_for_everyone)


# ------------------------------------------------------------------------------ frozen towers


def _tower_encoder(model: DualEncoder, split: TowerSplit, with_imagenet: bool):
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        feats = split.image_tower_fn(pixels).float()
        if with_imagenet:  # from the same forward pass
            feats = torch.cat([feats, model.imagenet_logits_from_features(feats).float()], dim=1)
        return feats

    return encode


def cached_image_tower_features(model: DualEncoder, split: TowerSplit, ds, cols, views: ViewSpec, cache_dir: str,
                                seed: int, batch_size: int, accelerator) -> tuple[torch.Tensor, int]:
    """Frozen image-tower features ``(N, K, F [+1000 ImageNet logits])`` of every view of every row.

    Keyed by the image tower, its preprocessing and the images alone -- not by the heads -- so a
    teacher aligned on frozen towers reuses, when it distils a student on the same images, the
    features its alignment run computed (a 50,000-image tower pass is 20 minutes on 2 cores).
    Returns the features and F (the columns before the ImageNet logits, which towers add for free).
    """
    with_imagenet = isinstance(model, TowerDualEncoder)
    transform = model.image_transform.to_json()
    tower_fp = module_fingerprint(split.image_tower, extra=transform)
    key = cache_key(f"image-tower/{tower_fp}/imagenet={with_imagenet}{views.cache_tag}", ds._fingerprint, transform,
                    views.views, seed)
    store = _store(cache_dir, "towers-" + key, accelerator)
    rows = encode_rows(ds, cols, views, model.image_transform, _tower_encoder(model, split, with_imagenet),
                       batch_size, accelerator.device, "image-tower features")
    out = store.get_or_build(len(ds), rows)
    log.info("frozen image-tower feature cache %s: %s", "hit" if out.hit else "built", out.path)
    feats = torch.from_numpy(out.images)
    return feats, feats.shape[2] - (1000 if with_imagenet else 0)


@torch.no_grad()
def _text_tower_features(split: TowerSplit, model: DualEncoder, texts: Sequence[str], batch_size: int = 256):
    out = []
    for i in range(0, len(texts), batch_size):
        tok = {k: v.to(model.device) for k, v in model.tokenize(list(texts[i : i + batch_size])).items()}
        out.append(split.text_tower_fn(tok["input_ids"], tok.get("attention_mask")).float().cpu())
    return torch.cat(out).numpy()


def cached_text_tower_features(model: DualEncoder, split: TowerSplit, texts: Sequence[str], cache_dir: str,
                               accelerator) -> torch.Tensor:
    """Frozen text-tower features ``(M, F)`` of ``texts``, cached under the text tower and the texts."""
    key = cache_key(f"text-tower/{module_fingerprint(split.text_tower)}", texts_sha(texts), "", 1, 0)
    store = _store(cache_dir, "towers-" + key, accelerator)
    out = store.get_or_build(0, lambda start, end: np.zeros((end - start, 1, 0), np.float32), texts,
                             lambda t: _text_tower_features(split, model, t))
    return torch.from_numpy(out.texts)


# ----------------------------------------------------------------------------- teacher targets


def teacher_image_rows(teacher: DualEncoder, ds, cols, views: ViewSpec, cache_dir: str, seed: int,
                       batch_size: int, accelerator) -> RowBuilder:
    """``(start, end) -> (rows, K, D)`` the teacher's normalised embeddings of every view of those rows.

    A teacher built on frozen towers gets them by its heads from the cached tower features (see
    :func:`cached_image_tower_features`): no second pass of its image tower.
    """
    if not isinstance(teacher, TowerDualEncoder):
        return encode_rows(ds, cols, views, teacher.image_transform, teacher.encode_image, batch_size,
                           accelerator.device, "teacher targets", dim=teacher.embed_dim)
    split = teacher.tower_split()

    @torch.no_grad()
    def embed(start: int, end: int) -> np.ndarray:
        feats, dim = cached_image_tower_features(teacher, split, ds, cols, views, cache_dir, seed, batch_size,
                                                 accelerator)
        head = split.image_head
        x = feats[start:end, :, :dim].flatten(0, 1).to(accelerator.device, next(head.parameters()).dtype)
        return F.normalize(head(x).float(), dim=-1).view(end - start, views.views, -1).cpu().numpy()

    return embed


def teacher_tower_features(teacher: DualEncoder, ds, cols, views: ViewSpec, cache_dir: str, seed: int,
                           batch_size: int, accelerator) -> torch.Tensor:
    """``(N, K, F)`` the teacher's frozen image-tower features of every view of every row (``loss.tower_weight``).

    The same cache entry :func:`teacher_image_rows` builds the targets from, so they cost no tower pass
    of their own; the ImageNet logits stored beside them are left out.

    Raises:
        ValueError: the teacher is not built on frozen towers (it has no tower features to match).
    """
    if not isinstance(teacher, TowerDualEncoder):
        raise ValueError(f"loss.tower_weight matches the features of a teacher built on frozen towers "
                         f"(configs/reference_*.yaml); teacher {teacher.name!r} is a {type(teacher).__name__}")
    feats, dim = cached_image_tower_features(teacher, teacher.tower_split(), ds, cols, views, cache_dir, seed,
                                             batch_size, accelerator)
    return feats[:, :, :dim].contiguous()


@torch.no_grad()
def embed_texts(model: DualEncoder, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Normalised text embeddings ``(M, D)`` of ``texts``, on the CPU."""
    return torch.cat([model.encode_text(list(texts[i : i + batch_size])).cpu() for i in range(0, len(texts), batch_size)])
