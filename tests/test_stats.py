"""Bootstrap intervals over facts and the temperature frontier, on known cases."""

from __future__ import annotations

import math

import numpy as np

from contraq.evaluation.stats import (
    bootstrap_rate,
    frontier_value,
    paired_bootstrap,
    per_fact_counts,
    ratio_bootstrap,
)


def test_per_fact_counts() -> None:
    assert per_fact_counts([0, 0, 1, 2, 2, 2], [1, 0, 1, 0, 0, 1]) == {
        0: (1.0, 2),
        1: (1.0, 1),
        2: (1.0, 3),
    }


def test_bootstrap_degenerate_and_known_interval() -> None:
    # Every fact has rate 0.5: every resample has rate 0.5.
    rate, lo, hi = bootstrap_rate({i: (2.0, 4) for i in range(10)})
    assert (rate, lo, hi) == (0.5, 0.5, 0.5)
    # 40 facts, half with rate 1 and half 0 (1 question each): the resampled rate is
    # Binomial(40, 0.5) / 40, whose central 95% lies within about +-1.96 * 0.079.
    counts = {i: (float(i % 2), 1) for i in range(40)}
    rate, lo, hi = bootstrap_rate(counts, n_boot=4000, seed=1)
    assert rate == 0.5
    sd = math.sqrt(0.25 / 40)
    assert abs(lo - (0.5 - 1.96 * sd)) < 0.04 and abs(hi - (0.5 + 1.96 * sd)) < 0.04
    assert all(math.isnan(v) for v in bootstrap_rate({}))


def test_bootstrap_resamples_facts_not_questions() -> None:
    # One fact of 100 hits and one of 100 misses: resampling facts gives rates 0, 0.5 or 1,
    # far wider than a binomial over 200 questions would.
    rate, lo, hi = bootstrap_rate({0: (100.0, 100), 1: (0.0, 100)}, n_boot=2000)
    assert rate == 0.5 and lo == 0.0 and hi == 1.0


def test_paired_bootstrap_sign_and_p_value() -> None:
    a = {i: (3.0, 4) for i in range(32)}
    b = {i: (1.0, 4) for i in range(32)}
    res = paired_bootstrap(a, b)
    assert res["diff"] == 0.5 and res["low"] == 0.5 and res["high"] == 0.5
    assert res["p_le_0"] == 0.0
    rng = np.random.default_rng(0)
    noisy = {i: (float(rng.integers(0, 5)), 4) for i in range(32)}
    res = paired_bootstrap(noisy, noisy)
    assert res["diff"] == 0.0 and res["p_le_0"] == 1.0


def test_frontier_interpolates_and_holds_ends() -> None:
    pts = [(0.2, 0.3), (0.6, 0.1), (0.4, 0.2)]
    assert abs(frontier_value(pts, 0.5) - 0.15) < 1e-12
    assert frontier_value(pts, 0.1) == 0.3 and frontier_value(pts, 0.9) == 0.1
    assert math.isnan(frontier_value([], 0.5))
    assert math.isnan(frontier_value([(math.nan, 0.2)], 0.5))


def test_coverage_counts_facts_with_at_least_one_counted_question():
    from contraq.evaluation.metrics import coverage

    recs = [
        {"fact_index": f, "genuine": g}
        for f, flags in enumerate([[1, 0, 0], [0, 0, 0], [1, 1, 1], [0, 0, 1]])
        for g in flags
    ]
    share, low, high = coverage(recs)
    assert share == 0.75 and low <= 0.75 <= high
    # Every fact covered: a degenerate interval at 1.
    assert coverage([{"fact_index": f, "genuine": 1} for f in range(5)]) == (1.0, 1.0, 1.0)
    # No measurable question: NaNs.
    assert all(x != x for x in coverage([{"fact_index": 0}]))


def _reference(counts_list, statistic, n_boot, seed):
    """The hand-written percentile bootstrap that scipy replaced: fact indices resampled with
    numpy, the same resample for every mapping (paired), the central 95% by np.quantile."""
    facts = sorted(set.intersection(*(set(c) for c in counts_list)))
    idx = np.random.default_rng(seed).integers(0, len(facts), size=(n_boot, len(facts)))
    rates = []
    for counts in counts_list:
        hits = np.array([counts[f][0] for f in facts])[idx].sum(1)
        tot = np.array([counts[f][1] for f in facts])[idx].sum(1)
        rates.append(hits / np.maximum(tot, 1))
    values = statistic(*rates)
    return float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975)), values


def test_scipy_intervals_match_the_hand_written_bootstrap() -> None:
    # 60 facts; b follows a closely (paired: a narrow difference interval; resampling a and b
    # apart would give one about five times wider).
    rng = np.random.default_rng(7)
    n = rng.integers(2, 9, size=60)
    hits_b = rng.binomial(n, rng.uniform(0.05, 0.9, size=60))
    hits_a = np.minimum(hits_b + rng.binomial(1, 0.3, size=60), n)
    a = {f: (float(hits_a[f]), int(n[f])) for f in range(60)}
    b = {f: (float(hits_b[f]), int(n[f])) for f in range(60)}
    rate_a, rate_b = hits_a.sum() / n.sum(), hits_b.sum() / n.sum()
    tol = 0.02  # Monte-Carlo noise of a 95% percentile bound at 4000 resamples, these data
    for seed in (1, 2):  # the reference draws other resamples: agreement within noise
        rate, low, high = bootstrap_rate(a, n_boot=4000, seed=0)
        ref_low, ref_high, _ = _reference([a], lambda x: x, 4000, seed)
        assert rate == rate_a and abs(low - ref_low) < tol and abs(high - ref_high) < tol
        d = paired_bootstrap(a, b, n_boot=4000, seed=0)
        ref_low, ref_high, diffs = _reference([a, b], np.subtract, 4000, seed)
        assert d["diff"] == rate_a - rate_b
        assert abs(d["low"] - ref_low) < tol / 2 and abs(d["high"] - ref_high) < tol / 2
        assert abs(d["p_le_0"] - float((diffs <= 0).mean())) < 0.01
        r = ratio_bootstrap(a, b, n_boot=4000, seed=0)
        ref_low, ref_high, _ = _reference([a, b], np.divide, 4000, seed)
        assert r["ratio"] == rate_a / rate_b
        assert abs(r["ratio_low"] - ref_low) < tol and abs(r["ratio_high"] - ref_high) < tol
    assert d["high"] - d["low"] < 0.08  # paired 0.04; a and b resampled apart: 0.23


def test_one_fact_and_a_ratio_interval_that_reaches_infinity() -> None:
    assert bootstrap_rate({3: (1.0, 4)}) == (0.25, 0.25, 0.25)  # scipy needs two facts
    assert paired_bootstrap({3: (1.0, 4)}, {3: (2.0, 4)}) == {
        "diff": -0.25,
        "low": -0.25,
        "high": -0.25,
        "p_le_0": 1.0,
    }
    # Some resamples draw only fact 1, where b found nothing: the upper bound is inf (the
    # hand-written np.quantile made it NaN).
    r = ratio_bootstrap({0: (1.0, 1), 1: (1.0, 1)}, {0: (1.0, 1), 1: (0.0, 1)}, n_boot=400)
    assert r["ratio"] == 2.0 and r["ratio_low"] == 1.0 and r["ratio_high"] == math.inf
