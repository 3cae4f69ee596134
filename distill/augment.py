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
