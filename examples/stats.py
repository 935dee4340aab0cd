"""Interval estimates the examples report: every rate and mean comes with its uncertainty.

Standard library only (no numpy needed), seeded, so a report can be reproduced exactly.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

Z95 = 1.959964


def wilson_interval(hits: int, total: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval for a binomial rate (sensible at 0 and at 1, unlike the normal one)."""
    if total == 0:
        return 0.0, 1.0
    p = hits / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def _percentiles(values: list[float], confidence: float) -> tuple[float, float]:
    values = sorted(values)
    tail = (1 - confidence) / 2
    low = values[int(math.floor(tail * (len(values) - 1)))]
    high = values[int(math.ceil((1 - tail) * (len(values) - 1)))]
    return low, high


def bootstrap_mean_interval(
    values: Sequence[float], *, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of a mean (a single value: the value itself)."""
    if not values:
        return float("nan"), float("nan")
    if len(values) == 1:
        return values[0], values[0]
    rng = random.Random(seed)
    n = len(values)
    means = [sum(rng.choices(values, k=n)) / n for _ in range(resamples)]
    return _percentiles(means, confidence)


def paired_bootstrap_difference(
    treated: Sequence[float],
    control: Sequence[float],
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Mean of ``treated[i] - control[i]`` and its percentile bootstrap interval (pairs resampled)."""
    if len(treated) != len(control):
        raise ValueError("paired samples must have the same length")
    differences = [t - c for t, c in zip(treated, control, strict=True)]
    if not differences:
        return float("nan"), float("nan"), float("nan")
    mean = sum(differences) / len(differences)
    low, high = bootstrap_mean_interval(differences, confidence=confidence, resamples=resamples, seed=seed)
    return mean, low, high
