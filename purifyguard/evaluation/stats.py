"""Confidence intervals for accuracies measured on n examples."""

from __future__ import annotations

import math

Z_95 = 1.959964


def wilson_interval(accuracy: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval for a proportion `accuracy` observed on n examples.

    For the worst-case accuracy (a count of examples) this is the usual binomial interval; for
    the mean over R runs it treats the mean as a proportion of n, which is conservative because
    averaging runs lowers the variance.
    """
    if n <= 0:
        return (0.0, 1.0)
    p = min(max(accuracy, 0.0), 1.0)
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half_width = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, centre - half_width), min(1.0, centre + half_width))


def difference_tolerance(accuracy: float, n: int, z: float = Z_95) -> float:
    """How far two accuracies near `accuracy` on n examples may differ by noise alone.

    z times the standard error of a difference of two independent proportions, and never less
    than one example (1 / n).
    """
    if n <= 0:
        return 1.0
    p = min(max(accuracy, 0.0), 1.0)
    return max(1.0 / n, z * math.sqrt(2 * p * (1 - p) / n))
