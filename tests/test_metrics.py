"""Metrics of a method's questions on hand-made inputs, and the MiniLM sentence embedder."""

from __future__ import annotations

import math

import pytest
import torch

from contraq.evaluation.metrics import (
    Embedder,
    answer_hit,
    contradiction_rate,
    counted_texts,
    distinct_n,
    fluency,
    grouped_diversity,
    hit_rate,
    pairwise_diversity,
    summarize,
)
from contraq.genuine import normalize_text
from contraq.lm.packaged import minilm_dir


def test_normalize_text() -> None:
    assert normalize_text("  The  CAPITAL,  is\tParis!! ") == "the capital is paris"
    assert normalize_text("New-York") == "new york"


@pytest.mark.parametrize(
    ("answer", "original", "hit"),
    [
        ("The capital of France is Paris.", "Paris", True),
        ("the capital of france is PARIS", "paris", True),
        ("It is in paris, France", "Paris!", True),
        ("It was made by Colt's Manufacturing Company.", "Colt's Manufacturing Company", True),
        ("It is in New-York", "New York", True),
        ("The Parisian style", "Paris", False),  # near-miss: not a whole word
        ("Parisian", "Paris", False),
        ("It is in Lyon", "Paris", False),
        ("The company is Colt", "Colt's Manufacturing Company", False),
        ("", "Paris", False),
        ("Paris", None, False),
        ("Paris", "", False),
        (None, "Paris", False),
    ],
)
def test_answer_hit(answer: str | None, original: str | None, hit: bool) -> None:
    assert answer_hit(answer, original) is hit


def test_hit_rate() -> None:
    assert hit_rate(["Paris is it", "Lyon", "x"], ["paris", "Paris", None]) == 0.5
    assert math.isnan(hit_rate(["a"], [None]))
    with pytest.raises(ValueError):
        hit_rate(["a"], [])


def test_contradiction_rate() -> None:
    log_c = [math.log(0.9), math.log(0.51), math.log(0.5), math.log(0.1), -math.inf]
    assert contradiction_rate(log_c) == pytest.approx(2 / 5)  # 0.5 itself is not > 0.5
    assert contradiction_rate(torch.tensor([0.0, -0.1])) == 1.0
    assert math.isnan(contradiction_rate([]))


def test_distinct_n() -> None:
    texts = ["Who is A?", "who is B?"]
    # unigrams: who, is, a, who, is, b -> 4 distinct of 6
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    # bigrams: (who is) (is a) (who is) (is b) -> 3 of 4
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(["a b c"], 2) == 1.0
    assert distinct_n(["same", "same"], 1) == 0.5
    assert distinct_n(["one"], 2) == 0.0
    with pytest.raises(ValueError):
        distinct_n(texts, 0)


def test_pairwise_diversity_and_fluency() -> None:
    e = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    # cosines: (0,1)=0, (0,2)=-1, (1,2)=0 -> mean -1/3 -> diversity 4/3
    assert pairwise_diversity(e) == pytest.approx(4 / 3)
    assert pairwise_diversity(torch.ones(4, 3)) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(pairwise_diversity(torch.ones(1, 3)))
    assert fluency([-10.0, -4.0], [5, 2]) == pytest.approx(-2.0)


@pytest.mark.slow
def test_embedder_diversity(embedder: Embedder) -> None:
    emb = embedder.encode(["Where is the Eiffel Tower?", "hello"])
    assert emb.shape == (2, 384)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    same = ["Who founded the company?"] * 4
    assert abs(embedder.diversity(same)) < 1e-5
    different = [
        "Who founded the company?",
        "What is the boiling point of water in Kelvin?",
        "Which river flows through Cairo?",
    ]
    d = embedder.diversity(different)
    assert d > 0.5
    # Per fact, then averaged: a fact of duplicates (0) and a diverse fact (d); a one-question
    # fact is left out.
    assert grouped_diversity([same, different, ["alone"]], embedder) == pytest.approx(d / 2)


@pytest.mark.slow
def test_embedder_matches_sentence_transformers_pooling(embedder: Embedder) -> None:
    """Mean pooling over real tokens: padding a text in a batch must not change it."""
    alone = embedder.encode(["A short one."])
    batched = embedder.encode(
        ["A short one.", "A much longer sentence with many more tokens in it."]
    )
    assert torch.allclose(alone[0], batched[0], atol=1e-5)
    assert minilm_dir().name == "model"


@pytest.mark.slow
def test_embedder_is_mean_pooled_minilm(embedder: Embedder) -> None:
    """The sentence-transformers pipeline gives all-MiniLM-L6-v2's embedding: the mean of the
    encoder's last hidden states over real tokens, L2-normalised (computed here by hand)."""
    from transformers import AutoModel, AutoTokenizer

    texts = ["Where is the Eiffel Tower?", "hello", "Who wrote Hamlet, and when was it staged?"]
    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    model = AutoModel.from_pretrained(str(minilm_dir())).eval()
    enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state  # [B, L, D]
    mask = enc["attention_mask"].unsqueeze(-1).float()  # [B, L, 1]
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    got = embedder.encode(texts)
    assert torch.allclose((got * expected).sum(-1), torch.ones(len(texts)), atol=1e-5)
    assert torch.allclose(got, expected, atol=1e-5)


def test_counted_texts_and_their_summary(embedder: Embedder) -> None:
    """Distinct counted questions per fact: rewordings that normalise alike are one, uncounted
    questions are none, and a fact without any counts as zero."""
    rows = [
        (0, "Who is A?", 1),
        (0, "who is A", 1),
        (0, "Where does A live?", 1),
        (0, "What is A?", 0),
        (1, "Who is B?", 0),
        (2, "Who is C?", 1),
    ]
    recs = [
        {
            "fact_index": f,
            "question": q,
            "genuine": float(g),
            "log_c": -0.1,
            "log_r": -1.0,
            "log_pq": -5.0,
            "length": 3.0,
            "n_actions": 4,
        }
        for f, q, g in rows
    ]
    counted = counted_texts(recs)
    assert counted == {0: ["Who is A?", "Where does A live?"], 1: [], 2: ["Who is C?"]}
    s = summarize(recs, embedder)
    assert s["counted_distinct"] == pytest.approx(1.0)  # (2 + 0 + 1) / 3
    # Only fact 0 has two: the diversity of its two distinct counted questions.
    assert s["counted_diversity"] == pytest.approx(embedder.diversity(counted[0]), abs=1e-6)
    assert math.isnan(summarize(recs[4:5], embedder)["counted_diversity"])


def test_summarize_known_values() -> None:
    recs = [
        {
            "fact_index": 0,
            "question": "Who is A?",
            "log_r": -1.0,
            "log_c": math.log(0.9),
            "answer": "A is Paris.",
            "original_answer": "Paris",
            "log_pq": -8.0,
            "length": 3.0,
            "n_actions": 4,
        },
        {
            "fact_index": 1,
            "question": "who is B?",
            "log_r": -3.0,
            "log_c": math.log(0.2),
            "answer": "B is Lyon.",
            "original_answer": "Paris",
            "log_pq": -2.0,
            "length": 1.0,
            "n_actions": 2,
        },
    ]
    s = summarize(recs)
    assert s["n_questions"] == 2 and s["n_facts"] == 2
    assert s["contradiction_rate"] == 0.5
    assert s["mean_log_c"] == pytest.approx((math.log(0.9) + math.log(0.2)) / 2)
    assert s["mean_log_r"] == -2.0 and s["hit_rate"] == 0.5
    assert s["distinct_1"] == pytest.approx(4 / 6) and s["distinct_2"] == pytest.approx(3 / 4)
    assert s["mean_length"] == 2.0 and s["fluency"] == pytest.approx(-1.5)
    assert math.isnan(s["diversity"])  # no embedder
    # The likelihood reward has no log C and no answers.
    for r in recs:
        del r["log_c"], r["answer"]
    s = summarize(recs)
    assert math.isnan(s["contradiction_rate"]) and math.isnan(s["hit_rate"])
