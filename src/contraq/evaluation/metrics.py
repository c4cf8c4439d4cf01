"""Metrics of a method's questions: pure functions on lists and tensors.

- counted (genuine) rate: a question, not an echo, judged a contradiction (:mod:`contraq.genuine`);
  raw judge rate (P(contradiction) > 0.5), question rate and echo rate beside it;
- independent rate: a question whose answer names the original (pre-edit) object while the
  question does not (a judge-free measure, :func:`independent_hit`);
- 95% bootstrap intervals over facts for the counted, raw and independent rates
  (:mod:`contraq.evaluation.stats`);
- mean log C, mean log R (unscaled); answer hit rate (:func:`answer_hit`);
- diversity: 1 - mean pairwise cosine similarity of MiniLM sentence embeddings, per fact, then
  averaged over facts (:class:`~contraq.lm.embedding.Embedder` and
  :func:`~contraq.lm.embedding.pairwise_diversity`, re-exported here);
- distinct-1/2: distinct word n-grams / all word n-grams (:func:`distinct_n`);
- distinct counted questions per fact, and the diversity among them (:func:`counted_texts`):
  how many *different* real contradictions a method finds, which the diversity of all its
  questions does not say (off-topic questions raise it);
- mean length (tokens, termination included) and fluency (mean log P_Q per token).

Imported by training (fresh-sample metrics) and by evaluation alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from contraq.evaluation.stats import bootstrap_rate, per_fact_counts
from contraq.genuine import normalize_text
from contraq.lm.embedding import Embedder, pairwise_diversity

LOG_HALF = math.log(0.5)

# --------------------------------------------------------------------------- text metrics


def answer_hit(answer: str | None, original: str | None) -> bool:
    """Whether ``answer`` mentions ``original`` as whole words, both normalised.

    "The capital is Paris." hits "paris"; "Parisian" does not hit "Paris". An empty or missing
    original never hits.
    """
    if not answer or not original:
        return False
    target = normalize_text(original)
    if not target:
        return False
    # Both strings are single-space separated words, so padding with spaces is a word-boundary
    # match that also works for non-ASCII words.
    return f" {target} " in f" {normalize_text(answer)} "


def hit_rate(answers: Sequence[str | None], originals: Sequence[str | None]) -> float:
    """Share of answers that mention their original answer; NaN when no pair has an original."""
    if len(answers) != len(originals):
        raise ValueError(f"hit_rate: {len(answers)} answers but {len(originals)} originals")
    pairs = [(a, o) for a, o in zip(answers, originals, strict=True) if o]
    if not pairs:
        return float("nan")
    return sum(answer_hit(a, o) for a, o in pairs) / len(pairs)


def contradiction_rate(log_c: Sequence[float] | Tensor) -> float:
    """Share of questions whose answer contradicts the fact: P(contradiction) > 0.5.

    Args:
        log_c: ``[N]`` log P_NLI(contradiction).
    """
    t = torch.as_tensor(log_c, dtype=torch.float64).flatten()
    if t.numel() == 0:
        return float("nan")
    return float((t > LOG_HALF).double().mean())


def mean(values: Iterable[float]) -> float:
    """Mean of the finite values; NaN if there are none."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else float("nan")


def words(text: str) -> list[str]:
    """The normalised words of ``text`` (see :func:`normalize_text`)."""
    return normalize_text(text).split()


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct word n-grams / all word n-grams over ``texts`` (n-grams never cross texts).

    Words are normalised (:func:`words`), so "Who?" and "who" are the same unigram. 0.0 when
    no text has n words.
    """
    if n < 1:
        raise ValueError(f"distinct_n: n must be >= 1, got {n}")
    grams = [tuple(w[i : i + n]) for t in texts for w in [words(t)] for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def fluency(log_pq: Sequence[float], lengths: Sequence[int]) -> float:
    """Mean over questions of log P_Q / length (nats per token, termination included)."""
    if len(log_pq) != len(lengths):
        raise ValueError(f"fluency: {len(log_pq)} log P_Q values but {len(lengths)} lengths")
    return mean(lp / n for lp, n in zip(log_pq, lengths, strict=True) if n > 0)


def grouped_diversity(groups: Sequence[Sequence[str]], embedder: Embedder) -> float:
    """Diversity within each group (one group = the questions of one fact), averaged over the
    groups that have at least two texts. All texts are embedded in one batched pass."""
    flat = [t for g in groups for t in g]
    emb = embedder.encode(flat)
    values: list[float] = []
    start = 0
    for g in groups:
        if len(g) >= 2:
            values.append(pairwise_diversity(emb[start : start + len(g)]))
        start += len(g)
    return mean(values)


def counted_texts(records: Sequence[dict[str, Any]]) -> dict[int, list[str]]:
    """``{fact: its distinct counted questions}`` (texts told apart after
    :func:`normalize_text`; first wording kept), with an empty list for a fact without any."""
    out: dict[int, dict[str, str]] = {}
    for r in records:
        texts = out.setdefault(int(r["fact_index"]), {})
        if rate_flags(r, "genuine_rate"):
            texts.setdefault(normalize_text(str(r["question"])), str(r["question"]))
    return {f: list(t.values()) for f, t in out.items()}


# --------------------------------------------------------------------------- summaries

SUMMARY_KEYS = (
    "n_questions",
    "n_facts",
    "genuine_rate",
    "coverage",
    "contradiction_rate",
    "question_rate",
    "echo_rate",
    "independent_rate",
    "mean_log_c",
    "mean_log_r",
    "hit_rate",
    "diversity",
    "counted_distinct",
    "counted_diversity",
    "distinct_1",
    "distinct_2",
    "mean_length",
    "fluency",
)


# Rates that get a 95% bootstrap interval over facts (``<key>_low``, ``<key>_high``).
CI_KEYS = ("genuine_rate", "coverage", "contradiction_rate", "independent_rate")


def independent_hit(rec: dict[str, Any]) -> bool | None:
    """The judge-free measure of a genuine contradiction: a question whose answer names the
    original (pre-edit) object while the question does not. ``None`` without an original."""
    original, answer = rec.get("original_answer"), rec.get("answer")
    if not original or answer is None:
        return None
    asked = answer_hit(str(rec.get("question", "")), original)
    return bool(rec.get("is_question")) and answer_hit(answer, original) and not asked


_COMPONENT_OF = {"genuine_rate": "genuine", "question_rate": "is_question", "echo_rate": "is_echo"}


def rate_flags(rec: dict[str, Any], key: str) -> bool | None:
    """Whether question ``rec`` counts for the rate ``key``; ``None`` where it is not
    measurable (no judge score, no original answer)."""
    if key == "contradiction_rate":
        return None if rec.get("log_c") is None else float(rec["log_c"]) > LOG_HALF
    if key == "independent_rate":
        return independent_hit(rec)
    value = rec.get(_COMPONENT_OF[key])
    return None if value is None else bool(value)


def flag_counts(records: Sequence[dict[str, Any]], key: str) -> dict[int, tuple[float, int]]:
    """``{fact: (questions counted for the rate key, measurable questions)}`` (questions where
    ``key`` is not measurable are left out; a fact without any is absent)."""
    rows = [(int(r["fact_index"]), rate_flags(r, key)) for r in records]
    rows = [(f, x) for f, x in rows if x is not None]
    return per_fact_counts([f for f, _ in rows], [x for _, x in rows])


def coverage(
    records: Sequence[dict[str, Any]], key: str = "genuine_rate", seed: int = 0
) -> tuple[float, float, float]:
    """Share of facts with at least one question counted for the rate ``key`` (for a
    knowledge-editing test: edits the method found a probing question for), and its 95%
    bootstrap interval over facts: ``(share, low, high)``; NaNs without measurable questions."""
    counts = flag_counts(records, key)
    return bootstrap_rate({f: (float(h > 0), 1) for f, (h, _) in counts.items()}, seed=seed)


def rate_summary(records: Sequence[dict[str, Any]], seed: int = 0) -> dict[str, float]:
    """The rates of :data:`SUMMARY_KEYS` from ``genuine_rate`` to ``independent_rate``, each over
    the questions where it is measurable, and for :data:`CI_KEYS` their 95% bootstrap
    intervals over facts (``<key>_low``, ``<key>_high``)."""
    out: dict[str, float] = {}
    keys = ("genuine_rate", "contradiction_rate", "question_rate", "echo_rate", "independent_rate")
    for key in keys:
        counts = flag_counts(records, key)
        if not counts:
            out[key] = float("nan")
            if key in CI_KEYS:
                out[f"{key}_low"] = out[f"{key}_high"] = float("nan")
            continue
        out[key] = sum(h for h, _ in counts.values()) / sum(n for _, n in counts.values())
        if key in CI_KEYS:
            _, out[f"{key}_low"], out[f"{key}_high"] = bootstrap_rate(counts, seed=seed)
    out["coverage"], out["coverage_low"], out["coverage_high"] = coverage(records, seed=seed)
    return out


def summarize(
    records: Sequence[dict[str, Any]], embedder: Embedder | None = None
) -> dict[str, float]:
    """Every metric of one method's questions.

    Args:
        records: one dict per question with ``fact_index``, ``question``, ``log_r``,
            ``log_pq``, ``length`` (tokens before termination), ``n_actions`` (termination
            included) and, for the contradiction reward, ``log_c``, ``is_question``,
            ``is_echo``, ``genuine``, ``answer`` and ``original_answer``.
        embedder: for the diversity; ``None`` leaves it NaN.

    Returns:
        ``{key: value}`` for :data:`SUMMARY_KEYS` plus ``<key>_low``/``<key>_high`` for
        :data:`CI_KEYS` (NaN where a metric does not apply, e.g. ``log_c`` under the
        likelihood reward). ``counted_distinct``: distinct counted questions per fact (mean
        over facts); ``counted_diversity``: the diversity among them, over facts with two or
        more. ``genuine_rate`` is the counted rate: a question, not an echo,
        judged a contradiction (:mod:`contraq.genuine`).
    """
    by_fact: dict[int, list[str]] = {}
    for r in records:
        by_fact.setdefault(int(r["fact_index"]), []).append(str(r["question"]))
    log_c = [float(r["log_c"]) for r in records if r.get("log_c") is not None]
    counted = counted_texts(records) if log_c else {}
    answers = [r.get("answer") for r in records if r.get("answer") is not None]
    originals = [r.get("original_answer") for r in records if r.get("answer") is not None]
    return {
        "n_questions": float(len(records)),
        "n_facts": float(len(by_fact)),
        **rate_summary(records),
        "mean_log_c": mean(log_c),
        "mean_log_r": mean(float(r["log_r"]) for r in records),
        "hit_rate": hit_rate(answers, originals) if answers else float("nan"),
        "diversity": grouped_diversity(list(by_fact.values()), embedder)
        if embedder
        else float("nan"),
        "counted_distinct": mean(len(t) for t in counted.values()),
        "counted_diversity": grouped_diversity(list(counted.values()), embedder)
        if embedder and counted
        else float("nan"),
        "distinct_1": distinct_n([str(r["question"]) for r in records], 1),
        "distinct_2": distinct_n([str(r["question"]) for r in records], 2),
        "mean_length": mean(float(r["length"]) for r in records),
        "fluency": fluency(
            [float(r["log_pq"]) for r in records], [int(r["n_actions"]) for r in records]
        ),
    }
