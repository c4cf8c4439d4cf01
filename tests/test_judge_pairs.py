"""The judge's synthetic pairs (contraq.judge.facts/forms/pairs/datasets): surface forms,
labels, reward-hack neutrals, the subject split, and the generated pairs pinned byte for byte
(judge v9 was trained on exactly these; v5, v7 and v8 on the same without the near-object
contradictions and the subjects naming an object)."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import pytest

from contraq.judge.config import NLITrainConfig
from contraq.judge.datasets import PROBE_SET, build_datasets
from contraq.judge.facts import heldout_subject, read_fact_rows, same_answer
from contraq.judge.forms import explicit_forms, negate, pronoun_forms
from contraq.judge.pairs import NLIPair, PairBuilder
from contraq.judge.vocab import CATEGORIES, SUBJECT_SLOT, split_hack_vocab

REPO = Path(__file__).resolve().parents[1]


def test_read_fact_rows_skips_null_edits_and_reports_bad_rows(tmp_path: Path) -> None:
    rows = read_fact_rows(REPO / "data" / "zsre_1000.jsonl")
    assert len(rows) == 992  # 8 rows have a null edited_answer
    assert all(r.edited and r.edited == r.edited.strip() for r in rows)
    assert rows[0].template == f"The manufacturer of {SUBJECT_SLOT} was"
    assert rows[0].origin.endswith("zsre_1000.jsonl:1")
    bad = tmp_path / "bad.jsonl"
    good = {
        "prompt": "The capital of X is",
        "subject": "X",
        "original_answer": "a",
        "edited_answer": "b",
        "edit_fact": "The capital of X is b",
        "original_fact": "The capital of X is a",
    }
    lines = [json.dumps(good)] * 3 + [json.dumps({**good, "edited_answer": None})]
    bad.write_text("\n".join(lines) + "\n")
    assert len(read_fact_rows(bad)) == 3  # the null edit is skipped
    bad.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        read_fact_rows(bad)


def test_surface_forms() -> None:
    t = f"The capital of {SUBJECT_SLOT} is"
    forms = explicit_forms(t, "The capital of France is", "France", "Paris")
    assert "Paris is the capital of France" in forms
    assert "France's capital is Paris" in forms
    assert "The capital of France was Paris" in forms
    assert "Its capital is Paris" in pronoun_forms(t, "Paris")
    t = f"{SUBJECT_SLOT} plays for"
    assert "He plays for New Jersey Devils" in pronoun_forms(t, "New Jersey Devils")
    t = f"What is the twin city of {SUBJECT_SLOT}? It is"
    assert "Manila is the twin city of Lyon" in explicit_forms(t, "", "Lyon", "Manila")
    assert same_answer("Colt's Manufacturing", "Colt's Manufacturing Company")
    assert not same_answer("Paris", "Lyon")


def test_pair_builder_labels() -> None:
    rows = read_fact_rows(REPO / "data" / "zsre_1000.jsonl")
    builder = PairBuilder(rows)
    # Templates of one subject with one original answer form one relation.
    colt = [r for r in rows if r.subject == "Colt King Cobra"]
    assert len({builder.rel[id(r)] for r in colt}) == 1
    rng = random.Random(0)
    pairs = [p for r in rows[:200] for p in builder.pairs_for(r, rng, per_class=2)]
    labels = [p.label for p in pairs]
    for label in ("entailment", "neutral", "contradiction"):
        assert labels.count(label) > 300
    # An entailed hypothesis names the premise's object, a contradiction never does unless it
    # negates it.
    by_premise = {f"{r.prompt} {r.edited}": r for r in rows[:200]}
    for p in pairs:
        r = by_premise[p.premise]
        if r.edited.lower() in r.subject.lower():  # junk edits such as "Telva is written in Telva"
            continue
        names_edit = re.search(rf"\b{re.escape(r.edited.lower())}\b", p.hypothesis.lower())
        if p.label == "entailment":
            assert names_edit, p
        if p.label == "contradiction" and p.kind != "contra-negation":
            assert not names_edit, p
        if p.kind == "contra-negation":
            assert names_edit and re.search(r"\bnot\b", p.hypothesis), p
    kinds = {p.kind for p in pairs}
    assert "contra-negation" in kinds and any(k.endswith("-negated") for k in kinds)


def test_negate() -> None:
    assert negate("The capital of Japan is Osaka") == "The capital of Japan is not Osaka"
    assert negate("Messi plays for Barcelona") == "Messi does not play for Barcelona"
    assert negate("He worked as a lawyer") == "He did not work as a lawyer"
    assert negate("Toyota produces the Camry") == "It is not true that Toyota produces the Camry"
    assert negate("The Camry has four doors").startswith("It is not true that the Camry")


def test_hack_neutrals() -> None:
    """The reward-hack neutrals: right shape, never where the shape could answer the relation."""
    rows = read_fact_rows(REPO / "data" / "zsre_1000.jsonl") + read_fact_rows(
        REPO / "data" / "counterfact_1000.jsonl"
    )
    builder = PairBuilder(rows)
    train_vocab, held_vocab = split_hack_vocab()
    assert not set(train_vocab.categories) & set(held_vocab.categories)
    assert len(train_vocab.categories) + len(held_vocab.categories) == len(CATEGORIES) >= 50
    rng = random.Random(0)
    shapes: dict[str, int] = {}
    for r in rows[::4]:
        rel = builder.rel[id(r)]
        for kind in builder.HACK_KINDS:
            made = builder.hack_hypothesis(r, r.edited, kind, rng)
            if made is None:
                assert kind == "famous-subject" and r.template is None
                continue
            hyp, pair_kind = made
            shapes[pair_kind] = shapes.get(pair_kind, 0) + 1
            if pair_kind == "neutral-descriptive-category":
                # Never for relations answered by a category ("X's occupation was judge").
                assert not builder.category_like[rel], (r.prompt, hyp)
                assert hyp.rstrip(".").endswith(train_vocab.categories), hyp
            if pair_kind == "neutral-descriptive-born":
                assert not builder.origin_like[rel] and "born" not in r.prompt, (r.prompt, hyp)
            if pair_kind == "neutral-famous-subject":
                assert any(f.lower() in hyp.lower() for f in train_vocab.famous_subjects), hyp
                if not any(r.subject.lower() in o.lower() for _, o in builder.objects[rel]):
                    assert r.subject.lower() not in hyp.lower(), (r.subject, hyp)
            # A restated question or a non-answer never names the premise's object.
            if pair_kind in ("neutral-question", "neutral-nonanswer") and (
                r.edited.lower() not in r.prompt.lower()
            ):
                assert r.edited.lower() not in hyp.lower(), (r.prompt, hyp)
    for shape in ("category", "known", "born", "echo"):
        assert shapes.get(f"neutral-descriptive-{shape}", 0) > 10, shapes
    occupation = [r for r in rows if r.prompt.endswith("occupation was")]
    assert occupation and all(builder.category_like[builder.rel[id(r)]] for r in occupation)
    # A category relation gets the "X was a <object>" wording as a real statement.
    t = f"{SUBJECT_SLOT}'s occupation was"
    assert "Harvey R. Miller was a judge" in explicit_forms(t, "", "Harvey R. Miller", "judge")
    with pytest.raises(ValueError, match="unknown kind"):
        builder.hack_hypothesis(rows[0], rows[0].edited, "sarcasm", rng)


def test_split_is_by_subject() -> None:
    assert heldout_subject("Colt King Cobra", 0.15, 0) == heldout_subject(
        "colt king cobra", 0.15, 0
    )
    cfg = NLITrainConfig(max_train_pairs=100_000, snli_train_pairs=0, ood_eval_files=[])
    train, held, ood, sizes = build_datasets(cfg)
    assert sizes["heldout_subjects"] > 100 and sizes["train_subjects"] > 1000
    held_premises = {p.premise for p in held}
    assert not held_premises & {p.premise for p in train}
    # The classes stay balanced with the hack neutrals in the mix.
    labels = [p.label for p in train]
    assert labels.count("neutral") == labels.count("entailment") == labels.count("contradiction")
    kinds = {p.kind for p in train}
    assert {"neutral-nonanswer", "neutral-question", "neutral-famous-subject"} <= kinds
    # The hack probes: neutral, held-out subjects, held-out vocabulary only.
    probes = ood[PROBE_SET]
    assert len(probes) > 500 and {p.label for p in probes} == {"neutral"}
    assert not {p.premise for p in probes} & {p.premise for p in train}
    train_vocab, held_vocab = split_hack_vocab()
    for p in probes:
        if p.kind == "probe-descriptive-category":
            assert p.hypothesis.rstrip(".").endswith(held_vocab.categories), p
        if p.kind == "probe-nonanswer":
            assert p.hypothesis not in train_vocab.non_answers, p
    # Deterministic with a seed.
    train2, held2, ood2, _ = build_datasets(cfg)
    assert train2 == train and held2 == held and ood2[PROBE_SET] == probes


def _digest(pairs: list[NLIPair]) -> str:
    h = hashlib.sha256()
    for p in pairs:
        h.update("\x1e".join((p.premise, p.hypothesis, p.label, p.kind)).encode() + b"\n")
    return h.hexdigest()


def test_generated_pairs_are_pinned() -> None:
    """The pairs of the default recipe (without the SNLI share, which needs shared/) are the
    ones the cached judge was trained on: any change to the generator or its tables must
    come with a new judge name."""
    cfg = NLITrainConfig(snli_train_pairs=0, ood_eval_files=[])
    train, held, ood, _ = build_datasets(cfg)
    assert (len(train), len(held), len(ood[PROBE_SET])) == (8400, 1500, 1092)
    assert _digest(train) == "d9a524b2f0b27bf139134d47936796b2de6455265e0773098a457abd0e206e31"
    assert _digest(held) == "73afdd2f25c18106b9c00c84a31b7e40d875fef84c2d9260df529222469a93bd"
    assert (
        _digest(ood[PROBE_SET])
        == "5f640e89689a2d2cf423b58937a2ea27001367a21c435866368e560d372c25a5"
    )


def test_first_pairs_are_pinned() -> None:
    rows = read_fact_rows(REPO / "data" / "zsre_1000.jsonl")
    builder = PairBuilder(rows)
    rng = random.Random(0)
    pairs = builder.pairs_for(rows[0], rng) + builder.pairs_for(
        rows[1], rng, premise_side="original", subject_swap=1.0
    )
    colt = "The manufacturer of Colt King Cobra was Colt's Manufacturing Corporation"
    picasso = "The company that manufactured Pablo Picasso is Colt's Manufacturing"
    assert [(p.premise, p.hypothesis, p.label, p.kind) for p in pairs] == [
        (
            colt,
            "Colt's Manufacturing Corporation is the corporation that created Colt King Cobra.",
            "entailment",
            "entail-explicit",
        ),
        (
            colt,
            "Colt's Manufacturing Company was the company that built Colt King Cobra.",
            "contradiction",
            "contra-edit-explicit",
        ),
        (
            colt,
            "In fact, Colt King Cobra was a large racing driver.",
            "neutral",
            "neutral-descriptive-category",
        ),
        (picasso, "The answer is Colt's Manufacturing.", "entailment", "entail-short"),
        (
            picasso,
            "Colt Motorcycles is the manufacturer of Pablo Picasso.",
            "contradiction",
            "contra-relation-explicit",
        ),
        (
            picasso,
            "The species that has the it gene is species.",
            "neutral",
            "neutral-other-relation-pronoun",
        ),
    ]
