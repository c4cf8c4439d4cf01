"""Statistics for comparing methods on the same facts: bootstrap over facts, frontiers.

Questions of one fact are not independent (one prompt, one subject the base LM does or does
not know), so every interval resamples *facts* with replacement and pools their questions.
Pure functions on plain lists; percentile intervals from ``scipy.stats.bootstrap``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import scipy.stats

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


def _pooled_rate(hits: np.ndarray, tot: np.ndarray, axis: int = -1) -> np.ndarray:
    """Pooled rate of facts along ``axis``: their hits over their questions."""
    return np.sum(hits, axis=axis) / np.maximum(np.sum(tot, axis=axis), 1.0)


def _columns(
    counts: Mapping[int, tuple[float, int]], facts: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """``(hits [F], questions [F])`` of ``facts`` in their order."""
    hits = np.array([counts[f][0] for f in facts], dtype=np.float64)
    tot = np.array([counts[f][1] for f in facts], dtype=np.float64)
    return hits, tot


def _bootstrap(
    columns: Sequence[np.ndarray],
    statistic: Callable[..., np.ndarray],
    n_boot: int,
    level: float,
    seed: int,
) -> tuple[float, float, np.ndarray]:
    """Percentile bootstrap of ``statistic(*columns, axis=-1)`` resampling facts (the columns'
    entries) jointly: ``(low, high, the statistic of every resample [n_boot])``.

    scipy draws the resamples as ``default_rng(seed).integers(0, F, (n_boot, F))``, each row
    one resample of fact indices. With one fact every resample is that fact (scipy wants two).
    """
    if len(columns[0]) < 2:
        value = float(statistic(*columns, axis=-1))
        return value, value, np.full(n_boot, value)
    with np.errstate(invalid="ignore"):  # its standard error of a ratio that reached inf
        res = scipy.stats.bootstrap(
            tuple(columns),
            statistic,
            n_resamples=n_boot,
            paired=True,  # the columns are one fact's numbers: resampled together
            vectorized=True,
            confidence_level=level,
            method="percentile",
            rng=np.random.default_rng(seed),
        )
    ci = res.confidence_interval
    return float(ci.low), float(ci.high), np.asarray(res.bootstrap_distribution)


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
    low, high, _ = _bootstrap(_columns(counts, facts), _pooled_rate, n_boot, level, seed)
    return (rate, low, high)


def _difference(
    hits_a: np.ndarray, tot_a: np.ndarray, hits_b: np.ndarray, tot_b: np.ndarray, axis: int = -1
) -> np.ndarray:
    return _pooled_rate(hits_a, tot_a, axis) - _pooled_rate(hits_b, tot_b, axis)


def _ratio(
    hits_a: np.ndarray, tot_a: np.ndarray, hits_b: np.ndarray, tot_b: np.ndarray, axis: int = -1
) -> np.ndarray:
    """``a / b`` of pooled rates: inf where only ``b`` is 0, 1 where both are (both found
    nothing)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = _pooled_rate(hits_a, tot_a, axis) / _pooled_rate(hits_b, tot_b, axis)
    return np.nan_to_num(ratios, nan=1.0, posinf=math.inf)


def _paired_columns(
    a: Mapping[int, tuple[float, int]], b: Mapping[int, tuple[float, int]]
) -> list[np.ndarray] | None:
    """``[hits_a, tot_a, hits_b, tot_b]`` on the facts both have; ``None`` without one."""
    facts = sorted(set(a) & set(b))
    if not facts:
        return None
    return [*_columns(a, facts), *_columns(b, facts)]


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
    columns = _paired_columns(a, b)
    if columns is None:
        return {"diff": math.nan, "low": math.nan, "high": math.nan, "p_le_0": math.nan}
    rate_a, rate_b = float(_pooled_rate(*columns[:2])), float(_pooled_rate(*columns[2:]))
    low, high, diffs = _bootstrap(columns, _difference, n_boot, level, seed)
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
    columns = _paired_columns(a, b)
    if columns is None:
        return nan
    rate_a, rate_b = float(_pooled_rate(*columns[:2])), float(_pooled_rate(*columns[2:]))
    ratio = rate_a / rate_b if rate_b else (math.inf if rate_a else math.nan)
    if not math.isfinite(ratio):
        return {**nan, "ratio": ratio}
    low, high, _ = _bootstrap(columns, _ratio, n_boot, level, seed)
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
