"""Statistics for comparing methods on the same facts: bootstrap over facts, frontiers.

Questions of one fact are not independent (one prompt, one subject the base LM does or does
not know), so every interval resamples *facts* with replacement and pools their questions.
Pure functions on plain lists; numpy for the resampling.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "bootstrap_rate",
    "frontier_value",
    "paired_bootstrap",
    "per_fact_counts",
    "ratio_bootstrap",
]


def per_fact_counts(
    fact_ids: Sequence[int], hits: Sequence[bool | float]
) -> dict[int, tuple[float, int]]:
    """``{fact: (sum of hits, number of questions)}``."""
    out: dict[int, tuple[float, int]] = {}
    for f, h in zip(fact_ids, hits, strict=True):
        s, n = out.get(int(f), (0.0, 0))
        out[int(f)] = (s + float(h), n + 1)
    return out


def _resampled_rates(
    counts: Mapping[int, tuple[float, int]], facts: Sequence[int], idx: np.ndarray
) -> np.ndarray:
    """Pooled rate of every resample: ``idx [n_boot, F]`` indexes ``facts``."""
    hits = np.array([counts[f][0] for f in facts], dtype=np.float64)
    tot = np.array([counts[f][1] for f in facts], dtype=np.float64)
    return hits[idx].sum(1) / np.maximum(tot[idx].sum(1), 1.0)


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """The central percentile interval of ``values`` at ``level`` (e.g. 0.95)."""
    alpha = (1.0 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


def bootstrap_rate(
    counts: Mapping[int, tuple[float, int]],
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Pooled rate and its percentile bootstrap interval over facts.

    Args:
        counts: :func:`per_fact_counts`.

    Returns:
        ``(rate, low, high)``; NaNs when there is no fact.
    """
    facts = sorted(counts)
    if not facts:
        return (math.nan, math.nan, math.nan)
    total = sum(counts[f][1] for f in facts)
    rate = sum(counts[f][0] for f in facts) / max(total, 1)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(facts), size=(n_boot, len(facts)))
    return (rate, *_interval(_resampled_rates(counts, facts, idx), level))


def _paired_rates(
    a: Mapping[int, tuple[float, int]],
    b: Mapping[int, tuple[float, int]],
    n_boot: int,
    seed: int,
) -> tuple[float, float, np.ndarray, np.ndarray] | None:
    """Pooled rates of ``a`` and ``b`` on the facts both have, and of every joint resample of
    those facts (``[n_boot]`` each); ``None`` without a common fact."""
    facts = sorted(set(a) & set(b))
    if not facts:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(facts), size=(n_boot, len(facts)))
    full = np.arange(len(facts))[None, :]
    rate_a = float(_resampled_rates(a, facts, full)[0])
    rate_b = float(_resampled_rates(b, facts, full)[0])
    return rate_a, rate_b, _resampled_rates(a, facts, idx), _resampled_rates(b, facts, idx)


def paired_bootstrap(
    a: Mapping[int, tuple[float, int]],
    b: Mapping[int, tuple[float, int]],
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Rate difference ``a - b`` on the facts both have, resampling facts jointly (paired).

    Returns:
        ``diff``, its interval ``low``/``high`` and ``p_le_0``: the share of resamples where
        ``a`` is not above ``b`` (a one-sided bootstrap p-value for "a is better").
    """
    rates = _paired_rates(a, b, n_boot, seed)
    if rates is None:
        return {"diff": math.nan, "low": math.nan, "high": math.nan, "p_le_0": math.nan}
    rate_a, rate_b, res_a, res_b = rates
    diffs = res_a - res_b
    low, high = _interval(diffs, level)
    return {"diff": rate_a - rate_b, "low": low, "high": high, "p_le_0": float((diffs <= 0).mean())}


def ratio_bootstrap(
    a: Mapping[int, tuple[float, int]],
    b: Mapping[int, tuple[float, int]],
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Ratio of pooled rates ``a / b`` on the facts both have, resampling facts jointly (the
    same resamples as :func:`paired_bootstrap` with the same seed).

    Returns:
        ``ratio`` and its percentile interval ``ratio_low``/``ratio_high`` (inf where a
        resample's ``b`` is 0 and its ``a`` is not; NaN without facts or when ``b`` is 0).
    """
    nan = {"ratio": math.nan, "ratio_low": math.nan, "ratio_high": math.nan}
    rates = _paired_rates(a, b, n_boot, seed)
    if rates is None:
        return nan
    rate_a, rate_b, res_a, res_b = rates
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = rate_a / rate_b if rate_b else (math.inf if rate_a else math.nan)
        ratios = res_a / res_b
    ratios = np.nan_to_num(ratios, nan=1.0, posinf=math.inf)  # 0/0: both found nothing
    if not math.isfinite(ratio):
        return {**nan, "ratio": ratio}
    low, high = _interval(ratios, level)
    return {"ratio": ratio, "ratio_low": low, "ratio_high": high}


def frontier_value(points: Sequence[tuple[float, float]], x: float) -> float:
    """The value at ``x`` of the piecewise-linear curve through ``points`` ``(x_i, y_i)``
    (sorted by ``x_i``), held constant beyond its ends; NaN without finite points.

    Used for the counted rate of the untrained policy at several temperatures as a function of
    diversity: a method is above the frontier when its rate beats this value at its diversity.
    """
    pts = sorted((float(px), float(py)) for px, py in points if math.isfinite(px + py))
    if not pts or not math.isfinite(x):
        return math.nan
    xs, ys = zip(*pts, strict=True)
    return float(np.interp(x, xs, ys))
