"""Objects close in meaning: the hard contradictions of the judge's training pairs.

Judge v8 read "The capital of Japan is Tokyo." against the edit "...is Osaka" as entailment
(0.99), and "Canberra is the capital of Australia." against "...is Sydney" too, while "...is
Paris" was a clear contradiction: a swap to an object close to the premise's in meaning was
taken for a restatement. The pairs of v9 contradict an edit with the objects of its relation
nearest to its own in sentence-embedding space, so that closeness is no sign of agreement. (It
was not enough for the capitals: v9 still reads those swaps as agreement; see docs/EXPERIMENTS.md section 8.)

The neighbours are a committed table (``tables/near_objects.json``, written by
``scripts/near_objects.py``), not computed when pairs are built: float rounding differs across
CPUs, and the pairs must stay a pure function of the facts, the tables and the seed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from contraq.genuine import normalize_text
from contraq.judge.facts import same_answer

if TYPE_CHECKING:  # the pair builder reads the table without torch
    import torch

NEAR_TABLE = "near_objects"
# Relations whose objects are regions (countries, continents). A region and a non-region may
# not exclude each other ("born in Tokyo" / "born in Japan"), so such a pair is never a near
# contradiction; two cities or two countries are. (zsRE's "state" relations are left out:
# their objects are noisy, "Paris" among them.)
REGION_RELATION = re.compile(
    r"\b(country|countries|citizen\w*|nationality|continent)\b",
    re.IGNORECASE,
)


def nearest_objects(
    objects: Sequence[str],
    embed: Callable[[list[str]], torch.Tensor],
    k: int,
    regions: Collection[str] = (),
) -> dict[str, list[str]]:
    """For each object, the ``k`` other objects with the highest cosine similarity of their
    embeddings, nearest first (ties by name); never one :func:`same_answer` as it, nor a region
    beside a non-region.

    Args:
        objects: distinct answers of one relation (duplicates after normalisation are merged).
        embed: texts -> ``[N, D]`` embeddings (e.g. :meth:`contraq.lm.embedding.Embedder.encode`).
        k: neighbours kept per object.
        regions: normalised names of regions (:func:`region_names`).
    """
    import torch

    uniq: dict[str, str] = {}
    for o in objects:
        uniq.setdefault(normalize_text(o), o)
    names = sorted(uniq.values())
    if len(names) < 2 or k < 1:
        return {}
    emb = torch.nn.functional.normalize(embed(names).double(), dim=-1)
    sim = (emb @ emb.T).tolist()  # [N, N]
    region = [normalize_text(n) in regions for n in names]
    out: dict[str, list[str]] = {}
    for i, a in enumerate(names):
        order = sorted(range(len(names)), key=lambda j: (-round(sim[i][j], 4), names[j]))
        near = [
            names[j]
            for j in order
            if j != i and not same_answer(a, names[j]) and region[i] == region[j]
        ][:k]
        if near:
            out[a] = near
    return out


def region_names(objects_by_relation: Mapping[str, Sequence[tuple[str, str]]]) -> set[str]:
    """Normalised objects of the relations :data:`REGION_RELATION` names (cluster keys are
    templates, e.g. "\\x00's country of citizenship BE")."""
    return {
        normalize_text(o)
        for rel, pairs in objects_by_relation.items()
        if REGION_RELATION.search(rel)
        for _, o in pairs
    }


def near_table(
    objects_by_relation: Mapping[str, Sequence[tuple[str, str]]],
    embed: Callable[[list[str]], torch.Tensor],
    k: int,
) -> dict[str, dict[str, list[str]]]:
    """:func:`nearest_objects` of every relation cluster of a
    :class:`~contraq.judge.pairs.PairBuilder` (``builder.objects``: cluster -> (subject,
    object) pairs), as ``{cluster: {object: [near objects]}}``."""
    regions = region_names(objects_by_relation)
    names = sorted({o for pairs in objects_by_relation.values() for _, o in pairs})
    emb = embed(names)  # one batched pass; each relation then indexes its rows
    row = {name: i for i, name in enumerate(names)}

    def cached(texts: list[str]) -> torch.Tensor:
        return emb[[row[t] for t in texts]]

    table: dict[str, dict[str, list[str]]] = {}
    for rel in sorted(objects_by_relation):
        near = nearest_objects([o for _, o in objects_by_relation[rel]], cached, k, regions)
        if near:
            table[rel] = near
    return table


def lookup(table: Mapping[str, Any], rel: str, obj: str) -> list[str]:
    """The near objects of ``obj`` in relation ``rel`` (``[]`` when the table has none)."""
    near = table.get(rel, {})
    if obj in near:
        return list(near[obj])
    key = normalize_text(obj)
    for name, objs in near.items():
        if normalize_text(name) == key:
            return list(objs)
    return []
