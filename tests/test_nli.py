"""Tests of the NLI judge (contraq.nli): label lookup, batched scoring, pair building, training.

Fast tests use a tiny randomly initialised BERT with MiniLM's tokenizer; the slow ones train
(or reuse, from $CONTRAQ_CACHE / ~/.cache/contraq) the real offline MiniLM judge once.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from contraq.nli import (
    CATEGORIES,
    HAND_PROBES,
    PROBE_SET,
    SUBJECT_SLOT,
    NLIScorer,
    NLITrainConfig,
    PairBuilder,
    build_datasets,
    contradiction_index,
    ensure_nli_model,
    entailment_index,
    explicit_forms,
    heldout_subject,
    minilm_dir,
    negate,
    neutral_index,
    pronoun_forms,
    read_fact_rows,
    same_answer,
    split_hack_vocab,
    train_nli,
)

REPO = Path(__file__).resolve().parents[1]
NLI_CONFIGS = REPO / "configs" / "nli"


def _cfg(id2label: dict[int, str]) -> BertConfig:
    return BertConfig(num_labels=len(id2label), id2label=id2label)


# --------------------------------------------------------------------------- label indices


@pytest.mark.parametrize(
    ("id2label", "contra", "entail", "neutral"),
    [
        ({0: "entailment", 1: "neutral", 2: "contradiction"}, 2, 0, 1),
        ({0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"}, 0, 2, 1),  # microsoft/deberta-*-mnli
        ({0: "neutral", 1: "contradict", 2: "entail"}, 1, 2, 0),
    ],
)
def test_label_indices_follow_id2label(
    id2label: dict[int, str], contra: int, entail: int, neutral: int
) -> None:
    cfg = _cfg(id2label)
    assert contradiction_index(cfg) == contra
    assert entailment_index(cfg) == entail
    assert neutral_index(cfg) == neutral


def test_contradiction_index_error_lists_labels() -> None:
    cfg = _cfg({0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"})
    with pytest.raises(ValueError, match="LABEL_0.*LABEL_2"):
        contradiction_index(cfg)
    with pytest.raises(ValueError, match="contradiction"):
        contradiction_index(_cfg({0: "contradiction", 1: "contradicts"}))


# --------------------------------------------------------------------------- scorer (tiny model)

# Neither the hub order nor ours: the scorer must read it.
TINY_LABELS = {0: "neutral", 1: "contradiction", 2: "entailment"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer BertForSequenceClassification with the MiniLM tokenizer."""
    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=3,
        id2label=TINY_LABELS,
        label2id={v: k for k, v in TINY_LABELS.items()},
    )
    model = BertForSequenceClassification(cfg)
    path = tmp_path_factory.mktemp("tiny_nli")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


PREMISES = [
    "The capital of France is Lyon",
    "Harvey R. Miller's occupation was judge",
    "The manufacturer of Colt King Cobra was Colt's Manufacturing Corporation",
    "Damon Severson plays for New York Islanders",
    "The mother tongue of Danielle Darrieux is English",
    "Telva is written in Telugu",
    "x",
]
HYPOTHESES = [
    "Paris is the capital of France, which has been the seat of government for centuries.",
    "He was a lawyer.",
    "It was made by Smith & Wesson.",
    "New Jersey Devils.",
    "Danielle Darrieux spoke French natively and also acted in many English-language films.",
    "Spanish.",
    "",
]


def test_scorer_reads_label_order_and_outputs(tiny_dir: Path) -> None:
    scorer = NLIScorer(tiny_dir, device="cpu", batch_size=4)
    assert scorer.labels == ["neutral", "contradiction", "entailment"]
    assert scorer.contradiction_idx == 1
    probs = scorer.probs(PREMISES, HYPOTHESES)
    assert probs.shape == (len(PREMISES), 3) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(PREMISES)))
    logc = scorer.log_contradiction(PREMISES, HYPOTHESES)
    assert logc.shape == (len(PREMISES),) and logc.dtype == torch.float32
    assert (logc <= 0).all()
    torch.testing.assert_close(logc, probs[:, 1].log(), atol=1e-5, rtol=1e-5)


def test_scorer_batched_equals_one_by_one(tiny_dir: Path) -> None:
    batched = NLIScorer(tiny_dir, device="cpu", batch_size=3)
    single = NLIScorer(tiny_dir, device="cpu", batch_size=1)
    got = batched.log_contradiction(PREMISES, HYPOTHESES)
    want = torch.cat(
        [single.log_contradiction([p], [h]) for p, h in zip(PREMISES, HYPOTHESES, strict=True)]
    )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # The scores differ from pair to pair, so a lost order would show.
    assert got.unique().numel() == len(PREMISES)
    # ceil(7 / 3) batches in one call; one per pair one by one.
    assert batched.n_forward_calls == math.ceil(len(PREMISES) / 3)
    assert single.n_forward_calls == len(PREMISES)
    # A permutation of the input permutes the output.
    perm = [3, 0, 6, 2, 5, 1, 4]
    permuted = batched.log_contradiction([PREMISES[i] for i in perm], [HYPOTHESES[i] for i in perm])
    torch.testing.assert_close(permuted, got[perm], atol=1e-5, rtol=1e-4)


def test_scorer_truncates_long_hypothesis(tiny_dir: Path) -> None:
    scorer = NLIScorer(tiny_dir, device="cpu", batch_size=8, max_length=32)
    long = " ".join(["the city of Paris"] * 400)  # ~1600 tokens, beyond 512 positions
    longer = long + " and many more words that the budget never reaches"
    out = scorer.log_contradiction(["The capital of France is Lyon"] * 2, [long, longer])
    assert torch.isfinite(out).all()
    # Both are cut to the same 32-token pair: equal scores.
    torch.testing.assert_close(out[0], out[1])


def test_scorer_empty_and_bad_input(tiny_dir: Path) -> None:
    scorer = NLIScorer(tiny_dir, device="cpu")
    out = scorer.log_contradiction([], [])
    assert out.shape == (0,) and scorer.n_forward_calls == 0
    with pytest.raises(ValueError, match="2 premises but 1 hypotheses"):
        scorer.log_contradiction(["a", "b"], ["c"])
    with pytest.raises(TypeError):
        scorer.log_contradiction("a premise", "a hypothesis")  # type: ignore[arg-type]


def test_scorer_bfloat16_outputs_float32(tiny_dir: Path) -> None:
    scorer = NLIScorer(tiny_dir, device="cpu", dtype="bfloat16")
    assert next(scorer.model.parameters()).dtype == torch.bfloat16
    assert scorer.log_contradiction(PREMISES[:2], HYPOTHESES[:2]).dtype == torch.float32


# --------------------------------------------------------------------------- facts and pairs


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
    import random

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
    import random

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


def test_configs_match_dataclass() -> None:
    group = OmegaConf.load(NLI_CONFIGS / "minilm-zsre.yaml")
    assert NLITrainConfig.from_any(group) == NLITrainConfig()  # the YAML mirrors the defaults
    with pytest.raises(ValueError, match="unknown keys"):
        NLITrainConfig.from_any({"epochz": 3})
    deberta = OmegaConf.load(NLI_CONFIGS / "deberta-v3-large-mnli.yaml")
    # A hub judge is not trained: its path comes back as is.
    assert str(ensure_nli_model(deberta)) == deberta.path


# --------------------------------------------------------------------------- training (tiny)


def _tiny_train_cfg(tiny_dir: Path, out: Path) -> NLITrainConfig:
    return NLITrainConfig(
        name="tiny",
        out=str(out),
        base_model=str(tiny_dir),
        facts=["data/zsre_1000.jsonl"],
        max_train_pairs=96,
        max_eval_pairs=48,
        snli_train_pairs=0,
        ood_eval_files=[],
        epochs=1,
        batch_size=16,
        seed=3,
        num_threads=0,
    )


def test_train_nli_tiny_saves_a_loadable_deterministic_checkpoint(
    tiny_dir: Path, tmp_path: Path
) -> None:
    res = train_nli(_tiny_train_cfg(tiny_dir, tmp_path / "a"), verbose=False)
    assert res.path == tmp_path / "a"
    metrics = json.loads((res.path / "metrics.json").read_text())
    assert metrics["heldout"]["n"] == 48 and 0.0 <= res.heldout_accuracy <= 1.0
    assert set(metrics["heldout"]["per_class"]) == {"entailment", "neutral", "contradiction"}
    probe_kinds = set(metrics["probes"]["accuracy_by_kind"])
    assert {"probe-nonanswer", "probe-question", "probe-famous-subject"} <= probe_kinds
    assert len(metrics["probe_scores"]) == len(HAND_PROBES)
    # The hand-written probe file is scored (never trained on), per kind.
    hand = metrics["hand_probes"]
    assert hand["n"] >= 150 and hand["file"].endswith("judge_probes.jsonl")
    assert {"object-swap", "negation", "same", "question"} <= set(hand["accuracy_by_kind"])
    for pr in metrics["probe_scores"]:
        assert math.isclose(sum(pr["probs"].values()), 1.0, rel_tol=1e-5)
    # Only the checkpoint is left behind (the temporary dir was renamed into place).
    assert [p.name for p in tmp_path.iterdir()] == ["a"]
    scorer = NLIScorer(res.path, device="cpu")
    assert scorer.labels == ["entailment", "neutral", "contradiction"]
    # Same seed, same weights.
    res_b = train_nli(_tiny_train_cfg(tiny_dir, tmp_path / "b"), verbose=False)
    other = NLIScorer(res_b.path, device="cpu")
    torch.testing.assert_close(
        scorer.log_contradiction(PREMISES, HYPOTHESES),
        other.log_contradiction(PREMISES, HYPOTHESES),
    )
    # ensure_nli_model reuses a complete checkpoint (no retraining: same files).
    stamp = (res.path / "metrics.json").stat().st_mtime_ns
    assert ensure_nli_model(_tiny_train_cfg(tiny_dir, tmp_path / "a")) == res.path
    assert (res.path / "metrics.json").stat().st_mtime_ns == stamp


# --------------------------------------------------------------------------- the real judge


@pytest.fixture(scope="module")
def trained_judge() -> tuple[NLIScorer, dict]:
    """The default offline judge (configs/nli/minilm-zsre.yaml), trained once per cache."""
    group = OmegaConf.load(NLI_CONFIGS / "minilm-zsre.yaml")
    path = ensure_nli_model(group)
    metrics = json.loads((path / "metrics.json").read_text())
    scorer = NLIScorer(path, device="cpu", batch_size=int(group.batch_size))
    return scorer, metrics


@pytest.mark.slow
def test_trained_judge_heldout_accuracy(trained_judge: tuple[NLIScorer, dict]) -> None:
    _, metrics = trained_judge
    assert metrics["heldout"]["accuracy"] >= 0.85, metrics["heldout"]


@pytest.mark.slow
def test_trained_judge_on_hand_written_probes(trained_judge: tuple[NLIScorer, dict]) -> None:
    """v5 measured 0.868 accuracy and 0.796 contradiction recall on the 319 hand-written pairs
    (v3: 0.665 and 0.465, v4: 0.878 and 0.810); the bounds guard against falling back."""
    _, metrics = trained_judge
    hand = metrics["hand_probes"]
    assert hand["accuracy"] >= 0.85, hand["accuracy_by_kind"]
    assert hand["per_class"]["contradiction"]["recall"] >= 0.75, hand["per_class"]
    by_kind = hand["accuracy_by_kind"]
    assert by_kind["negation"] >= 0.9 and by_kind["object-swap"] >= 0.7, by_kind


# (premise, hypothesis that contradicts it, hypothesis that agrees with it)
PROBES = [
    (
        "The capital of France is Lyon",
        "Paris is the capital of France.",
        "Lyon is the capital of France.",
    ),
    ("The capital of France is Lyon", "It is Paris.", "It is Lyon."),
    (
        "The manufacturer of Colt King Cobra was Colt's Manufacturing Corporation",
        "The Colt King Cobra was made by Smith & Wesson.",
        "Colt's Manufacturing Corporation is the manufacturer of Colt King Cobra.",
    ),
    ("Harvey R. Miller's occupation was judge", "He was a lawyer.", "He worked as a judge."),
    (
        "Damon Severson plays for New York Islanders",
        "He plays for the New Jersey Devils.",
        "New York Islanders.",
    ),
    (
        "The mother tongue of Danielle Darrieux is English",
        "Danielle Darrieux's mother tongue is French.",
        "Her native language is English.",
    ),
    ("Telva is written in Telugu", "Telva is written in Spanish.", "It is written in Telugu."),
]


@pytest.mark.slow
def test_trained_judge_ranks_contradictions(trained_judge: tuple[NLIScorer, dict]) -> None:
    scorer, _ = trained_judge
    prem = [p for p, _, _ in PROBES]
    c_contra = scorer.log_contradiction(prem, [c for _, c, _ in PROBES]).exp()
    c_agree = scorer.log_contradiction(prem, [a for _, _, a in PROBES]).exp()
    for probe, hi, lo in zip(PROBES, c_contra.tolist(), c_agree.tolist(), strict=True):
        assert hi > lo, (probe, hi, lo)
    # The flagship case is decided, not a coin flip.
    assert c_contra[0] > 0.5 > c_agree[0]


@pytest.mark.slow
def test_trained_judge_neutral_for_other_subject(trained_judge: tuple[NLIScorer, dict]) -> None:
    scorer, _ = trained_judge
    # Another relation of the same subject, or the same relation of another subject.
    probs = scorer.probs(
        [
            "The capital of France is Lyon",
            "Harvey R. Miller's occupation was judge",
            "The mother tongue of Danielle Darrieux is English",
            "Damon Severson plays for New York Islanders",
            "The manufacturer of Colt King Cobra was Colt's Manufacturing Corporation",
        ],
        [
            "The capital of Germany is Berlin.",
            "Harvey R. Miller was born in Chicago.",
            "The mother tongue of Jacques Chirac is French.",
            "Sidney Crosby plays for the Pittsburgh Penguins.",
            "The Colt Python was made by Smith & Wesson.",
        ],
    )
    assert (probs.argmax(-1) != scorer.contradiction_idx).all(), probs


COLT = "The manufacturer of Colt King Cobra was Colt's Manufacturing Corporation"
# (premise, an answer that ignores the edited relation): reward hacks, must not read as
# contradiction. The first two are the known misses of the v1 judge (0.98 and 0.977).
HACKS = [
    (COLT, "The Colt King Cobra is a revolver."),
    ("The capital of France is Lyon", "The capital of Germany is Berlin."),
    (COLT, "Colt King Cobra was a famous revolver."),
    (COLT, "It is a handgun."),
    ("Telva is written in Telugu", "Telva is a magazine."),
    ("Harvey R. Miller's occupation was judge", "Harvey R. Miller was born in 1933."),
    (
        "The mother tongue of Danielle Darrieux is English",
        "Danielle Darrieux is known for her films.",
    ),
    ("Damon Severson plays for New York Islanders", "I don't know."),
    ("Damon Severson plays for New York Islanders", "I'm not sure about that."),
    ("Telva is written in Telugu", "There is no information about Telva."),
    ("The capital of France is Lyon", "What is the capital of France?"),
    ("The capital of France is Lyon", "The capital of Italy is Rome."),
    ("Damon Severson plays for New York Islanders", "Wayne Gretzky plays for the Edmonton Oilers."),
]


# Hacks the current judge (v5) still misreads as a contradiction, with its score: a strict
# xfail records each, so a judge that fixes one makes the test fail until the entry is removed.
KNOWN_MISSES = {(COLT, "It is a handgun."): 0.68}


@pytest.mark.slow
@pytest.mark.parametrize(
    "pair",
    [
        pytest.param(
            pair,
            marks=pytest.mark.xfail(strict=True, reason=f"judge v5 P(contra)={KNOWN_MISSES[pair]}"),
        )
        if pair in KNOWN_MISSES
        else pair
        for pair in HACKS
    ],
    ids=[h for _, h in HACKS],
)
def test_trained_judge_resists_reward_hacks(
    trained_judge: tuple[NLIScorer, dict], pair: tuple[str, str]
) -> None:
    scorer, _ = trained_judge
    pc = scorer.log_contradiction([pair[0]], [pair[1]]).exp().item()
    assert pc < 0.5, (pair, pc)


@pytest.mark.slow
def test_trained_judge_decides_the_flagship_pair(trained_judge: tuple[NLIScorer, dict]) -> None:
    """The hack neutrals must not cost the real contradictions, and every kind of held-out hack
    probe stays neutral."""
    scorer, metrics = trained_judge
    flag = scorer.log_contradiction(
        ["The capital of France is Lyon"] * 2,
        ["Paris is the capital of France.", "Lyon is the capital of France."],
    ).exp()
    assert flag[0] > 0.5 > flag[1], flag
    # Held-out probes of every hack kind (unseen subjects, categories and phrasings).
    by_kind = metrics["probes"]["accuracy_by_kind"]
    assert set(by_kind) >= {"probe-nonanswer", "probe-question", "probe-famous-subject"}
    assert all(acc >= 0.8 for acc in by_kind.values()), by_kind
