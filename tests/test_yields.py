"""The set a method finds per fact: near-duplicates, meaning clusters, yields at a budget."""

from __future__ import annotations

import math

import pytest
import torch

from contraq.evaluation.stats import ratio_bootstrap
from contraq.evaluation.yields import (
    content_key,
    fact_yields,
    meaning_clusters,
    named_distinct,
    yield_summary,
)


def test_content_key_merges_function_words_and_order():
    same = [
        "What is the capital of France?",
        "What's the capital of France?",
        "what is  the CAPITAL of france",
        "France: what is its capital?",
    ]
    assert {content_key(q) for q in same} == {"capital france"}
    assert content_key("Which city is France's capital?") == "capital city france"
    assert content_key("Is Lyon the capital of France?") != content_key(same[0])
    assert content_key("Who is he?") == "who is he"  # no content word: all its words


@pytest.mark.slow
def test_meaning_clusters_on_hand_cases(embedder):
    qs = [
        "What is the capital of France?",
        "Which city is France's capital?",
        "Where is the capital of France?",
        "Is Lyon the capital of France?",
        "Where does the French government sit?",
        "What is the official language of France?",
        "What language do people speak in France?",
    ]
    labels = meaning_clusters(embedder.encode(qs))
    # One probe asked three ways; Lyon and the government are probes of their own; the
    # language questions are a fourth.
    assert labels[0] == labels[1] == labels[2]
    assert len({labels[0], labels[3], labels[4], labels[5]}) == 4
    assert labels[5] == labels[6]
    assert labels == sorted(labels) or labels[0] == 0  # numbered by first appearance
    assert meaning_clusters(embedder.encode(qs[:1])) == [0]
    assert meaning_clusters(torch.zeros(0, 384)) == []


def rec(fact: int, question: str, counted: bool) -> dict:
    return {"fact_index": fact, "question": question, "genuine": float(counted)}


@pytest.mark.slow
def test_fact_yields_count_the_first_n_in_drawing_order(embedder):
    records = [
        rec(0, "What is the capital of France?", True),
        rec(0, "What's the capital of France?", True),  # near-duplicate of the first
        rec(0, "What is the capital of Spain?", False),  # not counted
        rec(0, "Which city is France's capital?", True),  # distinct words, same meaning
        rec(0, "Where does the French government sit?", True),  # another probe
        rec(1, "Who wrote Hamlet?", False),
    ]
    y = fact_yields(records, [1, 2, 4, 5, 32], embedder.encode)
    assert {n: y[n][0][:2] for n in y} == {
        1: (1, 1),
        2: (1, 1),
        4: (2, 1),
        5: (3, 2),
        32: (3, 2),
    }
    assert all(y[n][1] == (0, 0, 0) for n in y)


def test_named_distinct_is_judge_free():
    base = {"original_answer": "Paris", "is_question": 1.0, "genuine": 0.0}
    records = [
        {**base, "question": "What is the capital of France?", "answer": "It is Paris."},
        {**base, "question": "What's the capital of France?", "answer": "Paris, of course."},
        {**base, "question": "Is Paris the capital?", "answer": "Yes, Paris is."},  # asked
        {**base, "question": "Which city hosts the Louvre?", "answer": "Paris hosts it."},
        {**base, "question": "What is France's capital?", "answer": "Lyon."},
    ]
    # The judge counted none; two distinct questions get Paris from the answer alone.
    assert named_distinct(records) == 2


def test_yield_summary_ratios_and_intervals():
    # The target finds twice the baseline's set on every fact: the ratio is 2 in every
    # resample, the difference is the baseline's mean.
    base = {0: (1, 1, 0), 1: (2, 1, 1), 2: (3, 2, 1), 3: (0, 0, 0)}
    target = {f: (2 * d, 2 * c, 2 * n) for f, (d, c, n) in base.items()}
    s = yield_summary({"t": {8: target}, "b": {8: base}}, target="t")
    cell = s["compare"]["b"]["8"]["distinct"]
    assert cell["ratio"] == cell["ratio_low"] == cell["ratio_high"] == 2.0
    assert cell["diff"] == pytest.approx(1.5) and cell["low"] > 0
    m = s["methods"]["b"]["8"]["clusters"]
    assert m["mean"] == 1.0 and m["low"] <= 1.0 <= m["high"]
    assert s["target"] == "t" and "t" not in s["compare"]
    assert yield_summary({"b": {8: base}}, target="t")["compare"] == {}


def test_ratio_bootstrap_edge_cases():
    a = {0: (3.0, 1), 1: (1.0, 1)}
    b = {0: (1.0, 1), 1: (1.0, 1)}
    r = ratio_bootstrap(a, b)
    assert r["ratio"] == 2.0 and 1.0 <= r["ratio_low"] <= 2.0 <= r["ratio_high"] <= 3.0
    assert math.isnan(ratio_bootstrap(a, {})["ratio"])
    zero = ratio_bootstrap(a, {0: (0.0, 1), 1: (0.0, 1)})
    assert zero["ratio"] == math.inf and math.isnan(zero["ratio_low"])
