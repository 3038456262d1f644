"""Means and 95% intervals over seeds, and paired differences between arms.

An experiment that runs both arms per seed from one shared base (tools/compare_rlp_ntp.py)
reports, per metric, the mean over seeds and a Student-t 95% interval of that mean:

    mean +- t_{0.975, n-1} * sd / sqrt(n)        sd: the sample standard deviation (n - 1)

and for a comparison of two arms the same interval of the per-seed differences (paired: both
arms of a seed share the base, the evaluation items and the evaluation seed, so their
difference cancels what the seed does to both). An interval that excludes zero is what the
experiment calls a win. With n = 1 there is no interval (`half` is None).

The t quantiles are written out (two-sided 95%, df 1..30, then the normal 1.96) rather than
taken from scipy, which the project does not depend on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# t_{0.975, df} for df = 1..30 (standard tables).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """The two-sided 95% Student-t quantile for `df` >= 1 degrees of freedom.

    Raises:
        ValueError: df < 1.
    """
    if df < 1:
        raise ValueError(f"df={df} (allowed: an integer >= 1)")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def mean_interval(values: Sequence[float]) -> dict:
    """Mean of `values` and its 95% interval.

    Returns:
        {"mean", "sd", "half", "low", "high", "n", "values"}; sd, half, low and high are None
        for a single value.

    Raises:
        ValueError: no values.
    """
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("no values")
    n, mean = len(xs), sum(xs) / len(xs)
    out = {"mean": mean, "sd": None, "half": None, "low": None, "high": None, "n": n,
           "values": xs}
    if n > 1:
        sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
        half = t_quantile_975(n - 1) * sd / math.sqrt(n)
        out.update(sd=sd, half=half, low=mean - half, high=mean + half)
    return out


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict:
    """`mean_interval` of the per-seed differences a[i] - b[i], plus the verdict:
    "a" or "b" when the interval excludes zero on that side, "tie" when it holds zero,
    "n/a" with one seed.

    Raises:
        ValueError: lengths differ, or no values.
    """
    if len(a) != len(b):
        raise ValueError(f"paired values differ in length: {len(a)} and {len(b)}")
    out = mean_interval([x - y for x, y in zip(a, b, strict=True)])
    if out["half"] is None:
        out["verdict"] = "n/a"
    else:
        out["verdict"] = "a" if out["low"] > 0 else "b" if out["high"] < 0 else "tie"
    return out


def binomial_se(p: float, n: int) -> float:
    """Standard error sqrt(p (1 - p) / n) of an accuracy p over n items."""
    return math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def items_for_se(target: float, p: float = 0.5) -> int:
    """The fewest items whose accuracy has a standard error <= `target` at accuracy `p`
    (the worst case p = 0.5 by default): ceil(p (1 - p) / target^2)."""
    return math.ceil(p * (1 - p) / target**2)
