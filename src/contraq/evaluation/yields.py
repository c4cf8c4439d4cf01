"""The set a method finds for a fact at a budget of answered questions (docs/DESIGN.md, "The
set"): how many *distinct* counted contradictions, and how many *meaning clusters* among them.

- A counted contradiction is a question, not an echo, whose answer the judge finds
  contradicts the edit (:func:`contraq.evaluation.metrics.rate_flags`, ``genuine_rate``).
- Near-duplicates are merged by :func:`content_key`: the same content words, in any order and
  form of the function words ("What is the capital of France?", "What's the capital of
  France?" and "France: what is its capital?" are one).
- The judge-free count beside them: distinct questions whose answer names the original
  (pre-edit) object while the question does not (:func:`named_distinct`), which no judge
  error can inflate.
- Meaning clusters merge paraphrases (:func:`meaning_clusters`): average-linkage clustering
  of MiniLM embeddings, cut where the mean cosine similarity between two groups drops below
  0.8. "What is the capital of France?" and "Which city is France's capital?" are one probe;
  "Is Lyon the capital of France?" and "Where does the French government sit?" are two more.
- The budget counts answered questions, the cost a user pays: a method's first ``N``
  questions of a fact in the order it drew them (a sample of ``N`` for independent draws and
  for a draw without replacement in its order; beam search's ``N`` best beams of the widest
  search run).

Pure functions on records; the embedding model is passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from torch import Tensor

from contraq.evaluation.metrics import independent_hit, rate_flags
from contraq.evaluation.stats import bootstrap_rate, paired_bootstrap, ratio_bootstrap
from contraq.genuine import content_key
from contraq.lm.embedding import meaning_clusters


def by_fact(records: Sequence[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """``{fact: its records in the order given}`` (the order the method drew them)."""
    out: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        out.setdefault(int(r["fact_index"]), []).append(r)
    return out


def counted_distinct(records: Sequence[dict[str, Any]]) -> list[str]:
    """The distinct counted questions among ``records`` (first wording of each
    :func:`content_key`), in order."""
    seen: dict[str, str] = {}
    for r in records:
        if rate_flags(r, "genuine_rate"):
            seen.setdefault(content_key(str(r["question"])), str(r["question"]))
    return list(seen.values())


def named_distinct(records: Sequence[dict[str, Any]]) -> int:
    """How many distinct questions (by :func:`content_key`) among ``records`` get an answer
    that names the original (pre-edit) object while the question does not: the judge-free
    count (:func:`contraq.evaluation.metrics.independent_hit`)."""
    return len({content_key(str(r["question"])) for r in records if independent_hit(r)})


Embed = Callable[[Sequence[str]], Tensor]


def fact_yields(
    records: Sequence[dict[str, Any]], budgets: Sequence[int], embed: Embed
) -> dict[int, dict[int, tuple[int, int, int]]]:
    """Per budget ``N``, per fact: ``(distinct counted contradictions, meaning clusters among
    them, distinct questions whose answer names the original object)`` in the fact's first
    ``N`` records (all of them when it has fewer).

    Args:
        embed: texts -> ``[N, D]`` embeddings (e.g. ``Embedder.encode``); each distinct text
            is embedded once.
    """
    facts = by_fact(records)
    texts = sorted({t for recs in facts.values() for t in counted_distinct(recs)})
    vectors = dict(zip(texts, embed(texts), strict=True)) if texts else {}
    out: dict[int, dict[int, tuple[int, int, int]]] = {}
    for n in budgets:
        out[n] = {}
        for f, recs in facts.items():
            found = counted_distinct(recs[:n])
            named = named_distinct(recs[:n])
            if not found:
                out[n][f] = (0, 0, named)
                continue
            emb = np.stack([vectors[t].numpy() for t in found])
            out[n][f] = (len(found), len(set(meaning_clusters(Tensor(emb)))), named)
    return out


def _means(per_fact: Mapping[int, tuple[int, ...]], which: int) -> dict[int, tuple[float, int]]:
    """``{fact: (value, 1)}``: a mean over facts as a pooled rate for
    :mod:`contraq.evaluation.stats`."""
    return {f: (float(v[which]), 1) for f, v in per_fact.items()}


# What fact_yields counts, in its order: judge-counted distinct questions, their meaning
# clusters, and the judge-free count (the answer names the original object).
KINDS = ("distinct", "clusters", "named")


def yield_summary(
    yields: Mapping[str, Mapping[int, Mapping[int, tuple[int, ...]]]],
    target: str | None,
    seed: int = 0,
) -> dict[str, Any]:
    """Means over facts with 95% bootstrap intervals, per method, budget and kind
    (:data:`KINDS`); and ``target``'s paired comparison with every other method
    at each budget: the difference and the ratio of means, each with its interval.

    Args:
        yields: ``{method: fact_yields(...)}``.
        target: the method compared with the others (absent or ``None``: no comparisons).

    Returns:
        ``{"methods": {m: {N: {kind: {mean, low, high}}}}, "target": target,
        "compare": {other: {N: {kind: {diff, low, high, p_le_0, ratio, ratio_low,
        ratio_high}}}}}`` with budgets as strings (JSON keys).
    """
    methods: dict[str, Any] = {}
    for m, per_budget in yields.items():
        methods[m] = {}
        for n, per_fact in per_budget.items():
            cell = {}
            for k, kind in enumerate(KINDS):
                mean, low, high = bootstrap_rate(_means(per_fact, k), seed=seed)
                cell[kind] = {"mean": mean, "low": low, "high": high}
            methods[m][str(n)] = cell
    compare: dict[str, Any] = {}
    if target in yields:
        for other in (m for m in yields if m != target):
            compare[other] = {}
            for n, mine in yields[target].items():
                theirs = yields[other].get(n)
                if theirs is None:
                    continue
                cell = {}
                for k, kind in enumerate(KINDS):
                    a, b = _means(mine, k), _means(theirs, k)
                    diff = paired_bootstrap(a, b, seed=seed)
                    ratio = ratio_bootstrap(a, b, seed=seed)
                    cell[kind] = {**diff, **ratio}
                compare[other][str(n)] = cell
    return {"methods": methods, "target": target if target in yields else None, "compare": compare}
