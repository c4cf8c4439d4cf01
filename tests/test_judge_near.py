"""Near objects (contraq.judge.near) and the v9 pair kinds built from them: contradictions
with an object close in meaning, and subjects that name one of the fact's objects."""

from __future__ import annotations

import random
import re
from pathlib import Path

import torch

from contraq.genuine import normalize_text
from contraq.judge.facts import FactRow, read_fact_rows, same_answer
from contraq.judge.near import lookup, near_table, nearest_objects, region_names
from contraq.judge.pairs import PairBuilder
from contraq.judge.vocab import OVERLAP_NAMES, SUBJECT_SLOT, load_table

REPO = Path(__file__).resolve().parents[1]

# Hand-made 2-d embeddings: Osaka and Tokyo point the same way, Paris elsewhere, Japan
# (a region) beside Tokyo.
VECTORS = {
    "Osaka": [1.0, 0.1],
    "Tokyo": [1.0, 0.2],
    "Kyoto": [1.0, 0.5],
    "Paris": [0.0, 1.0],
    "Japan": [1.0, 0.15],
    "Tokyo Metropolis": [1.0, 0.12],
}


def embed(texts: list[str]) -> torch.Tensor:
    return torch.tensor([VECTORS[t] for t in texts])


def test_nearest_objects_by_cosine_without_same_answers_or_regions() -> None:
    near = nearest_objects(["Paris", "Osaka", "Tokyo", "Kyoto", "osaka"], embed, k=2)
    assert near["Osaka"] == ["Tokyo", "Kyoto"]  # "osaka" is the same answer: merged
    assert near["Paris"] == ["Kyoto", "Tokyo"]
    # "Tokyo Metropolis" names the same thing as "Tokyo" (same_answer): never a contradiction.
    near = nearest_objects(["Tokyo", "Tokyo Metropolis", "Osaka"], embed, k=2)
    assert near["Tokyo"] == ["Osaka"]
    # A region beside a non-region may contain it: "Japan" is no near object of "Osaka".
    near = nearest_objects(["Osaka", "Japan", "Tokyo"], embed, k=2, regions={"japan"})
    assert near["Osaka"] == ["Tokyo"] and "Japan" not in near  # Japan's only peers are cities
    assert nearest_objects(["Osaka"], embed, k=3) == {}


def test_near_table_and_lookup() -> None:
    objects = {
        "the capital of \x00 BE": [("Japan", "Osaka"), ("Japan", "Tokyo"), ("France", "Paris")],
        "\x00 BE a citizen of": [("A", "Japan"), ("B", "Kyoto")],
    }
    assert region_names(objects) == {"japan", "kyoto"}
    table = near_table(objects, embed, k=1)
    assert table["the capital of \x00 BE"]["Osaka"] == ["Tokyo"]
    assert table["the capital of \x00 BE"]["Paris"] == ["Tokyo"]
    assert lookup(table, "the capital of \x00 BE", "osaka") == ["Tokyo"]  # normalised key
    assert lookup(table, "the capital of \x00 BE", "Lima") == []
    assert lookup(table, "no such relation", "Osaka") == []


def test_committed_table_matches_the_facts() -> None:
    """Every relation and object of tables/near_objects.json is one of the default facts',
    and no neighbour is the same answer as its object (scripts/near_objects.py wrote it)."""
    rows = read_fact_rows(REPO / "data" / "zsre_1000.jsonl") + read_fact_rows(
        REPO / "data" / "counterfact_1000.jsonl"
    )
    builder = PairBuilder(rows)
    table = load_table("near_objects")
    assert len(table) > 300
    regions = region_names(builder.objects)
    for rel, near in table.items():
        objs = {o for _, o in builder.objects[rel]}
        for obj, others in near.items():
            assert obj in objs and set(others) <= objs and 1 <= len(others) <= 5, (rel, obj)
            assert not any(same_answer(obj, o) for o in others), (rel, obj, others)
            in_region = normalize_text(obj) in regions
            assert all((normalize_text(o) in regions) == in_region for o in others)


def _capital_rows() -> list[FactRow]:
    t = f"The capital of {SUBJECT_SLOT} is"
    return [
        FactRow("The capital of Japan is", "Japan", t, "Osaka", "Tokyo", "x:1"),
        FactRow("The capital of Peru is", "Peru", t, "Lima", "Cusco", "x:2"),
        FactRow("The capital of Chile is", "Chile", t, "Santiago", "Valparaiso", "x:3"),
    ]


def test_near_share_draws_contradictions_from_the_table() -> None:
    rows = _capital_rows()
    builder = PairBuilder(rows)
    rel = builder.rel[id(rows[0])]
    builder.near = {rel: {"Osaka": ["Santiago"]}}
    rng = random.Random(0)
    contras = [
        p
        for _ in range(200)
        for p in builder.pairs_for(rows[0], rng, near_share=1.0)
        if p.label == "contradiction"
    ]
    near = [p for p in contras if p.kind.startswith("contra-near")]
    assert near and all("santiago" in p.hypothesis.lower() for p in near)
    assert all(p.premise == "The capital of Japan is Osaka" for p in contras)
    # Without a share, no near kind, and the relation's other answers are drawn as before.
    plain = [p for _ in range(200) for p in builder.pairs_for(rows[0], rng)]
    assert not any(p.kind.startswith("contra-near") for p in plain)


def test_overlap_subjects_name_either_object_with_right_labels() -> None:
    rows = _capital_rows()
    builder = PairBuilder(rows)
    rng = random.Random(1)
    named = {"premise object": 0, "other object": 0}
    for _ in range(200):
        pairs = builder.pairs_for(rows[0], rng, overlap_swap=1.0)
        subject = pairs[0].premise.removeprefix("The capital of ").removesuffix(" is Osaka")
        assert any(re.fullmatch(n.format(o=".+"), subject) for n in OVERLAP_NAMES), subject
        named["premise object" if "Osaka" in subject else "other object"] += 1
        for p in pairs:
            if p.label == "entailment":
                rest = p.hypothesis.lower().replace(subject.lower(), "")
                assert "osaka" in rest, p  # names the premise's object beside the subject
    assert min(named.values()) > 60, named  # the overlap is no sign of either label
