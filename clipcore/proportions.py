"""The confidence interval of a proportion, torch-free (the parity report renders without torch)."""

from __future__ import annotations

import math
from statistics import NormalDist

LEVEL = 0.95


def wilson_interval(fraction: float, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of a proportion measured on ``n`` independent items.

    A parity report stores an agreement as a fraction of its images, not the per-image hits, and for
    one proportion Wilson's interval is what a bootstrap would approximate, without its collapse to a
    point at 0 % and 100 % (1,000 images all agreeing still leave 99.6-100 %).
    """
    if n < 1:
        raise ValueError(f"a proportion of {n} items has no interval")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction}: expected a proportion in [0, 1]")
    z = NormalDist().inv_cdf((1 + level) / 2)
    denominator = 1 + z * z / n
    centre = (fraction + z * z / (2 * n)) / denominator
    half = z * math.sqrt(fraction * (1 - fraction) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)
