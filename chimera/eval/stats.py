"""Confidence intervals: Wilson for rates, percentile bootstrap for means and quantiles (seeded)."""
from __future__ import annotations

import math
import random
from typing import Callable, Sequence


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n ((0, 1) when n == 0)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default), nan for no data."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def bootstrap(xs: Sequence[float], stat: Callable[[Sequence[float]], float] = mean, n_boot: int = 1000,
              seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap interval of `stat` over `xs`."""
    if not xs:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    n = len(xs)
    vals = sorted(stat([xs[rng.randrange(n)] for _ in range(n)]) for _ in range(n_boot))
    return vals[int(alpha / 2 * (n_boot - 1))], vals[int((1 - alpha / 2) * (n_boot - 1))]


def rate(flags: Sequence[bool]) -> dict:
    """{'value', 'lo', 'hi', 'n'} of a list of booleans."""
    k, n = sum(bool(f) for f in flags), len(flags)
    lo, hi = wilson(k, n)
    return {"value": k / n if n else float("nan"), "lo": lo, "hi": hi, "n": n}


def summary(xs: Sequence[float], stat: Callable = mean, seed: int = 0) -> dict:
    lo, hi = bootstrap(xs, stat, seed=seed)
    return {"value": stat(xs), "lo": lo, "hi": hi, "n": len(xs)}
