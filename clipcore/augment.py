"""Deterministic augmented views shared by teacher and student.

A view is a random-resized crop plus an optional horizontal flip whose parameters depend only
on (seed, dataset row, view number). It is applied to the decoded image *before* each model's
own resize/normalise, so the teacher (at its resolution) and the student (at its own) see the
same crop, and the teacher's embedding of view k can be cached and reused in every epoch.
View 0 is always the plain image. Seeds are strings (random.Random hashes them with SHA-512):
Python's salted ``hash()`` would differ between processes and runs.
"""

from __future__ import annotations

import bisect
import functools
import math
import random
from dataclasses import dataclass, field

import torch
from PIL import Image

from clipcore.imaging import ImageTransform


def reduce_image(image: Image.Image, side: int) -> Image.Image:
    """``image`` reduced (bicubic, aspect kept) to a short side of ``side`` pixels and scaled back to its own
    size: what a student with a ``side``-pixel input can see of it. Smaller images are returned as they are."""
    image = image.convert("RGB")
    scale = side / min(image.size)
    if scale >= 1:
        return image
    small = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
    return image.resize(small, Image.BICUBIC).resize(image.size, Image.BICUBIC)


@dataclass(frozen=True)
class ViewSpec:
    """K seeded views per row; ``reduce_to`` > 0 also reduces every view (view 0 included) to that short
    side and back (:func:`reduce_image`): the teacher then embeds what a student at that side sees."""

    views: int = 1
    seed: int = 0
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    reduce_to: int = 0

    def __post_init__(self) -> None:
        if self.views < 1:
            raise ValueError(f"cache.views must be >= 1, got {self.views}")
        if self.reduce_to < 0:
            raise ValueError(f"teacher_side must be a positive number of pixels, got {self.reduce_to}")

    @property
    def changes_view0(self) -> bool:
        """Whether view 0 differs from the plain image (it does only when reduced)."""
        return self.reduce_to > 0

    @property
    def cache_tag(self) -> str:
        """Added to a cache key of embeddings of these views ('' for unreduced views: earlier keys stay valid)."""
        return f"/reduced={self.reduce_to}" if self.reduce_to else ""

    def view_for(self, row: int, epoch: int) -> int:
        """The view a row uses in an epoch: 0 when there is one view, else a seeded draw."""
        if self.views == 1:
            return 0
        return random.Random(f"{self.seed}/epoch/{epoch}/{row}").randrange(self.views)

    def box(self, row: int, view: int, width: int, height: int) -> tuple[tuple[int, int, int, int], bool]:
        """(left, top, right, bottom) of the crop and whether to flip, as RandomResizedCrop draws them."""
        if view == 0:
            return (0, 0, width, height), False
        rng = random.Random(f"{self.seed}/view/{row}/{view}")
        area = width * height
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                left, top = rng.randint(0, width - w), rng.randint(0, height - h)
                return (left, top, left + w, top + h), rng.random() < 0.5
        return (0, 0, width, height), rng.random() < 0.5  # fallback: whole image

    def apply(self, image: Image.Image, row: int, view: int) -> Image.Image:
        box, flip = self.box(row, view, *image.size)
        out = image.crop(box) if box != (0, 0, *image.size) else image
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out
        return reduce_image(out, self.reduce_to) if self.reduce_to else out


@dataclass(frozen=True)
class SourceViews:
    """One segment of a mixture: ``rows`` images, each ``views`` times (view-major), the whole ``repeat`` times."""

    rows: int
    views: ViewSpec
    repeat: int = 1

    @property
    def length(self) -> int:
        return self.rows * self.views.views * self.repeat


class RowViews:
    """The ``(image, row) -> image`` step of a mixture whose sources have fixed views (``data.train[i].views``).

    The mixture lays each source out as ``repeat`` copies of its K views, each view a block of all its
    rows: mixture row ``start + (copy * K + k) * rows + i`` is view ``k`` of the source's image ``i``,
    cropped by that source's :class:`ViewSpec` as when its teacher targets were computed (view 0: the
    plain image). ``key`` describes the layout, so stores of decoded pixels can tell layouts apart.
    """

    def __init__(self, segments: list[SourceViews]):
        self.segments = list(segments)
        self.starts = [0]
        for seg in self.segments:
            self.starts.append(self.starts[-1] + seg.length)
        self.key = ";".join(f"{s.rows}x{s.views.views}x{s.repeat}/{s.views.seed}/{s.views.scale}/{s.views.ratio}"
                            for s in self.segments)

    def __len__(self) -> int:
        return self.starts[-1]

    def locate(self, row: int) -> tuple[int, int, int]:
        """(segment, image row within its source, view) of a mixture row."""
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} outside the mixture's {len(self)} rows")
        seg = bisect.bisect_right(self.starts, row) - 1
        local = row - self.starts[seg]
        n = self.segments[seg].rows
        return seg, local % n, (local // n) % self.segments[seg].views.views

    def __call__(self, image: Image.Image, row: int) -> Image.Image:
        seg, i, view = self.locate(row)
        return self.segments[seg].views.apply(image, i, view) if view else image


@dataclass(frozen=True)
class StudentJitter:
    """Random horizontal flips and small shifts of the student's pixels only (``data.student_flip``,
    ``data.student_shift``), the standard CIFAR augmentation, and optionally a low-resolution copy
    (``data.student_lowres``: the probability; ``data.student_lowres_min``: the smallest side).

    The teacher's target stays that of the un-jittered image, so with cached targets this costs no
    teacher pass; it relies on the teacher being nearly invariant to a flip or a shift of a few
    pixels, which holds for a CNN on CIFAR-sized objects. Shifts pad with 0, the mean colour after
    normalisation.
    """

    flip: bool = False
    shift: int = 0
    lowres: float = 0.0
    lowres_min: int = 16
    # one probability per dataset row instead of ``lowres`` (a mixture's ``data.train[i].student_lowres``), looked
    # up by the batch's row indices; the draws stay those of ``lowres``, so two runs differ only where it differs
    lowres_rows: torch.Tensor | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.shift < 0:
            raise ValueError(f"data.student_shift must be >= 0 pixels, got {self.shift}")
        if not 0.0 <= self.lowres <= 1.0:
            raise ValueError(f"data.student_lowres is a probability in [0, 1], got {self.lowres}")
        if self.lowres_min < 1:
            raise ValueError(f"data.student_lowres_min must be >= 1 pixel, got {self.lowres_min}")
        if self.lowres_rows is not None and not bool(((self.lowres_rows >= 0) & (self.lowres_rows <= 1)).all()):
            raise ValueError("per-source data.train[i].student_lowres are probabilities in [0, 1]")

    def __bool__(self) -> bool:
        return self.flip or self.shift > 0 or self._any_lowres

    @functools.cached_property
    def _any_lowres(self) -> bool:
        # once, not every step: lowres_rows holds one share per training row
        return self.lowres > 0 if self.lowres_rows is None else bool((self.lowres_rows > 0).any())

    def _share(self, rows: torch.Tensor | None, b: int) -> torch.Tensor | float:
        """The probability of a low-resolution copy for each of the batch's ``b`` images."""
        if self.lowres_rows is None:
            return self.lowres
        if rows is None or len(rows) != b:
            raise ValueError("per-source student_lowres needs the batch's dataset row of every image ('index')")
        return self.lowres_rows[rows.cpu()]

    def _lowres(self, pixels: torch.Tensor, generator: torch.Generator,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """A ``lowres`` share of the images down to one side drawn from [lowres_min, H) and back up:
        the student learns the sharp image's target from a blurred one, as a small (32 px) photo
        upsampled to its input looks. One side per batch keeps it a single interpolate call."""
        b, _, h, w = pixels.shape
        if self.lowres_min >= min(h, w):
            return pixels
        side = int(torch.randint(self.lowres_min, min(h, w), (1,), generator=generator))
        pick = (torch.rand(b, generator=generator) < self._share(rows, b)).to(pixels.device)
        small = torch.nn.functional.interpolate(pixels, size=(side, side), mode="bilinear", antialias=True,
                                                align_corners=False)
        blurred = torch.nn.functional.interpolate(small, size=(h, w), mode="bicubic", align_corners=False)
        return torch.where(pick[:, None, None, None], blurred, pixels)

    def __call__(self, pixels: torch.Tensor, generator: torch.Generator,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
        """``rows``: the dataset row of each image, for per-row ``lowres_rows``."""
        if self._any_lowres:
            pixels = self._lowres(pixels, generator, rows)
        b, _, h, w = pixels.shape
        if self.flip:
            flip = (torch.rand(b, generator=generator) < 0.5).to(pixels.device)
            pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
        if self.shift:
            s = self.shift
            padded = torch.nn.functional.pad(pixels, (s, s, s, s))
            dy, dx = (torch.randint(0, 2 * s + 1, (b,), generator=generator).to(pixels.device) for _ in range(2))
            rows = (dy[:, None] + torch.arange(h, device=pixels.device))[:, :, None]  # (B, H, 1)
            cols = (dx[:, None] + torch.arange(w, device=pixels.device))[:, None, :]  # (B, 1, W)
            batch = torch.arange(b, device=pixels.device)[:, None, None]
            pixels = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)
        return pixels


@dataclass(frozen=True)
class MixSpec:
    """Function matching (``data.mix``; Beyer et al. 2022, "Knowledge distillation: a good teacher
    is patient and consistent"): a ``share`` of each training batch is replaced by mixes of two of its
    images, mixup or, with probability ``cutmix``, CutMix, and the teacher embeds every mix online.
    The student then matches the teacher's function *between and beyond* the training images, on
    compositions the sources do not hold, not only at the images whose targets are cached.
    """

    share: float = 0.0
    cutmix: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.share <= 1.0:
            raise ValueError(f"data.mix.share is a fraction of the batch in [0, 1], got {self.share}")
        if not 0.0 <= self.cutmix <= 1.0:
            raise ValueError(f"data.mix.cutmix is a probability in [0, 1], got {self.cutmix}")

    def __bool__(self) -> bool:
        return self.share > 0

    def count(self, batch: int) -> int:
        """Mixes in a batch of ``batch`` images (none in a batch of one: there is nothing to mix)."""
        return 0 if batch < 2 else min(batch, round(self.share * batch))

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``images`` (B, C, H, W) -> (the rows to replace, (k,), and their mixes, (k, C, H, W)).

        Row ``rows[i]`` is mixed with another row of the batch: with weight ``lam`` ~ U(0, 1) for
        mixup, or for CutMix by pasting the other image into a box of (about) ``1 - lam`` of the area.
        """
        b, _, h, w = images.shape
        k = self.count(b)
        rows = torch.randperm(b, generator=generator)[:k]
        partners = (rows + torch.randint(1, max(b, 2), (k,), generator=generator)) % b  # never the row itself
        lam = torch.rand(k, generator=generator)
        cut = torch.rand(k, generator=generator) < self.cutmix
        centre = torch.rand(k, 2, generator=generator)
        rows_d, partners_d = rows.to(images.device), partners.to(images.device)
        a, o = images[rows_d], images[partners_d]
        lam_d = lam.to(images.device, images.dtype)[:, None, None, None]
        mixup = lam_d * a + (1 - lam_d) * o
        box = self._boxes(lam, centre, h, w).to(images.device)
        cutmix = torch.where(box[:, None], o, a)
        return rows_d, torch.where(cut.to(images.device)[:, None, None, None], cutmix, mixup)

    @staticmethod
    def _boxes(lam: torch.Tensor, centre: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(k, H, W) masks of CutMix boxes: sides sqrt(1 - lam) of the image's, clipped at its edges."""
        side = (1 - lam).sqrt()
        half_h, half_w = side * h / 2, side * w / 2
        cy, cx = centre[:, 0] * h, centre[:, 1] * w
        ys = torch.arange(h, dtype=torch.float32)[None, :] + 0.5
        xs = torch.arange(w, dtype=torch.float32)[None, :] + 0.5
        in_y = (ys >= (cy - half_h)[:, None]) & (ys < (cy + half_h)[:, None])  # (k, H)
        in_x = (xs >= (cx - half_w)[:, None]) & (xs < (cx + half_w)[:, None])  # (k, W)
        return in_y[:, :, None] & in_x[:, None, :]


_TORCH_MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest-exact"}


def _mean_std(transform: ImageTransform, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    def channels(values):
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, 3, 1, 1)
    return channels(transform.mean), channels(transform.std)


def unnormalise(pixels: torch.Tensor, transform: ImageTransform) -> torch.Tensor:
    """Normalised pixels (B, 3, H, W) back to RGB in [0, 1] (for the 1/255 rescale of every CLIP
    processor): the inverse of the last step of ``transform``."""
    mean, std = _mean_std(transform, pixels)
    return pixels * std + mean


def preprocess_tensor(images: torch.Tensor, transform: ImageTransform) -> torch.Tensor:
    """RGB (B, 3, H, W) in [0, 1] -> what ``transform`` makes of the same pixels: resize, centre
    crop and normalise on tensors, for images built on the device (``data.mix``). Torch's bicubic
    kernel is not PIL's, so values differ from :meth:`ImageTransform.__call__` by a few 1e-2 at edges
    (lanczos / box / hamming resample as bicubic here)."""
    h, w = images.shape[-2:]
    if isinstance(transform.size, int):
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(transform.size * long / short)
        size = (new_long, transform.size) if w <= h else (transform.size, new_long)
    else:
        size = tuple(transform.size)
    if size != (h, w):
        mode = _TORCH_MODES.get(transform.resample, "bicubic")
        kwargs = {} if mode == "nearest-exact" else {"align_corners": False, "antialias": True}
        images = torch.nn.functional.interpolate(images, size=size, mode=mode, **kwargs).clamp(0.0, 1.0)
    if transform.crop_size is not None:
        images = _centre_crop(images, *transform.crop_size)
    return normalise(images, transform)


def normalise(images: torch.Tensor, transform: ImageTransform) -> torch.Tensor:
    """RGB (B, 3, H, W) in [0, 1] -> normalised with ``transform``'s mean and std (no resize)."""
    mean, std = _mean_std(transform, images)
    return (images - mean) / std


def _centre_crop(images: torch.Tensor, ch: int, cw: int) -> torch.Tensor:
    h, w = images.shape[-2:]
    if h < ch or w < cw:  # pad with black like ImageTransform.crop
        ph, pw = max(ch - h, 0), max(cw - w, 0)
        images = torch.nn.functional.pad(images, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        h, w = images.shape[-2:]
    top, left = (h - ch) // 2, (w - cw) // 2
    return images[..., top:top + ch, left:left + cw]
