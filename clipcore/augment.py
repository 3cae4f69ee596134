"""Deterministic augmented views shared by teacher and student.

A view is a random-resized crop plus an optional horizontal flip whose parameters depend only
on (seed, dataset row, view number). It is applied to the decoded image *before* each model's
own resize/normalise, so the teacher (at its resolution) and the student (at its own) see the
same crop, and the teacher's embedding of view k can be cached and reused in every epoch.
View 0 is always the plain image. Seeds are strings (random.Random hashes them with SHA-512):
Python's salted ``hash()`` would differ between processes and runs.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from PIL import Image


@dataclass(frozen=True)
class ViewSpec:
    views: int = 1
    seed: int = 0
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self) -> None:
        if self.views < 1:
            raise ValueError(f"cache.views must be >= 1, got {self.views}")

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
        return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out


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

    def __post_init__(self) -> None:
        if self.shift < 0:
            raise ValueError(f"data.student_shift must be >= 0 pixels, got {self.shift}")
        if not 0.0 <= self.lowres <= 1.0:
            raise ValueError(f"data.student_lowres is a probability in [0, 1], got {self.lowres}")
        if self.lowres_min < 1:
            raise ValueError(f"data.student_lowres_min must be >= 1 pixel, got {self.lowres_min}")

    def __bool__(self) -> bool:
        return self.flip or self.shift > 0 or self.lowres > 0

    def _lowres(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A ``lowres`` share of the images down to one side drawn from [lowres_min, H) and back up:
        the student learns the sharp image's target from a blurred one, as a small (32 px) photo
        upsampled to its input looks. One side per batch keeps it a single interpolate call."""
        b, _, h, w = pixels.shape
        if self.lowres_min >= min(h, w):
            return pixels
        side = int(torch.randint(self.lowres_min, min(h, w), (1,), generator=generator))
        pick = (torch.rand(b, generator=generator) < self.lowres).to(pixels.device)
        small = torch.nn.functional.interpolate(pixels, size=(side, side), mode="bilinear", antialias=True,
                                                align_corners=False)
        blurred = torch.nn.functional.interpolate(small, size=(h, w), mode="bicubic", align_corners=False)
        return torch.where(pick[:, None, None, None], blurred, pixels)

    def __call__(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.lowres:
            pixels = self._lowres(pixels, generator)
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
