"""Counted rates and the paired comparison, the commands' settings, and `contraq sample` /
`contraq eval` on a tiny run folder (random 2-layer LM + saved LoRA adapter, random tiny BERT
as the NLI judge). The other metrics: test_metrics.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import randomize_lora_b, save_tiny_nli
from contraq.cli import compose, main
from contraq.config.checks import ConfigError
from contraq.config.settings import typed
from contraq.evaluation.evaluate import EvalConfig, compare_to_trained
from contraq.evaluation.metrics import independent_hit, rate_summary
from contraq.evaluation.questions import first_new_content
from contraq.genuine import content_key
from contraq.run.load import RunError, load_parts, resolve_run

# --------------------------------------------------------------------------- rates and comparisons


def _rec(fact: int, question: str, answer: str, p_contra: float, **flags: float) -> dict:
    return {
        "fact_index": fact,
        "question": question,
        "answer": answer,
        "original_answer": "Paris",
        "log_c": math.log(p_contra),
        **flags,
    }


def test_counted_rates_and_independent_measure() -> None:
    recs = [
        # A genuine contradiction whose answer names the original object.
        _rec(
            0,
            "What is the capital of France?",
            "It is Paris.",
            0.9,
            is_question=1,
            is_echo=0,
            genuine=1,
        ),
        # An echo: judged a contradiction, not counted; it names Paris, but so does the question.
        _rec(0, "Is Paris the capital?", "Yes, Paris.", 0.9, is_question=1, is_echo=1, genuine=0),
        # A non-question.
        _rec(1, "Paris is big. Who?", "Paris is big.", 0.8, is_question=0, is_echo=1, genuine=0),
        # A question judged neutral.
        _rec(
            1, "What is France?", "France is a country.", 0.1, is_question=1, is_echo=0, genuine=0
        ),
    ]
    s = rate_summary(recs)
    assert s["contradiction_rate"] == 0.75 and s["genuine_rate"] == 0.25
    assert s["question_rate"] == 0.75 and s["echo_rate"] == 0.5
    assert s["independent_rate"] == 0.25
    # Fact 0 has a counted contradiction, fact 1 none: half the facts are covered.
    assert s["coverage"] == 0.5 and 0.0 <= s["coverage_low"] <= 0.5 <= s["coverage_high"] <= 1.0
    assert s["genuine_rate_low"] <= 0.25 <= s["genuine_rate_high"]
    assert [independent_hit(r) for r in recs] == [True, False, False, False]
    # The trained policy against a method that is worse on every fact: a positive paired diff.
    worse = [dict(r, genuine=0) for r in recs]
    comp = compare_to_trained({"trained": recs, "other": worse})
    assert comp["other"]["diff"] == 0.25 and comp["other"]["low"] >= 0.0
    assert compare_to_trained({"other": worse}) == {}


# --------------------------------------------------------------------------- settings


def test_eval_and_demo_read_one_set_of_defaults() -> None:
    """configs/evaluation/ is the one place of the comparison's defaults: `contraq eval` has
    them at its top level, `contraq demo` under ``evaluation.`` with the run's seed."""
    ecfg = typed(EvalConfig, compose("eval", ["checkpoint=RUN"]))
    demo = compose("demo", ["seed=3", "evaluation.n=2"])
    from_demo = typed(EvalConfig, demo.evaluation, prefix="evaluation.")
    assert from_demo == EvalConfig(**{**vars(ecfg), "seed": 3, "n": 2})
    assert "demo" not in demo and compose("train", []).evaluation is None


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["n=0"], "n"),
        (["temperatures=[0.5,0]"], "temperatures"),
        (["batch_size=x"], "batch_size"),
        (["judge=???"], "judge"),
        (["split=train"], "split"),
    ],
)
def test_eval_settings_name_the_bad_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=f"^evaluation.{key}: "):
        typed(
            EvalConfig,
            compose("demo", [f"evaluation.{o}" for o in overrides]).evaluation,
            prefix="evaluation.",
        )


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["eval"], "checkpoint: missing"),
        (["eval", "checkpoint=RUN", "nn=3"], "Could not override 'nn'"),
        (["eval", "checkpoint=RUN", "n=0"], "n: must be >= 1"),
        (
            ["sample", "checkpoint=RUN", "facts=F", "out=O", "temperature=0"],
            "temperature: must be > 0",
        ),
        (["sample", "checkpoint=RUN", "facts=F"], "out: missing"),
        (["rescore", "records=NOPE", "judge=J"], "out: missing"),
        (["rescore", "records=NOPE", "judge=J", "out=O"], "NOPE/eval.json not found"),
    ],
)
def test_command_settings_errors_are_one_line(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"contraq {argv[0]}: ") and says in err and err.count("\n") == 1, err


# --------------------------------------------------------------------------- a tiny run folder


def tiny_config(nli_dir: Path, data_path: Path) -> dict:
    """The resolved config of a run on the tiny model (what training writes as config.yaml)."""
    return {
        "name": "tiny",
        "seed": 0,
        "model": {"source": "tiny", "tiny_arch": "llama", "termination_token": "?", "lora_r": 4},
        "prompt": {
            "template": "Ask one short question about {subject}.",
            "raw_template": "Generate a question about {subject}:\nQuestion:",
            "use_chat_template": "auto",
        },
        "sampler": {
            "min_len": 2,
            "max_len": 6,
            "top_k": 0,
            "top_p": 1.0,
            "ban_penalty": 1.0e4,
        },
        "reward": {
            "name": "contradiction",
            "w_lik": 0.05,
            "min_len": 2,
            "min_log_r": -50.0,
            "answer_max_new_tokens": 4,
            "batch_size": 16,
        },
        "nli": {"path": str(nli_dir), "batch_size": 16},
        "data": {
            "path": str(data_path),
            "val_fraction": 0.2,
            "test_fraction": 0.4,
            "split_seed": 0,
        },
    }


FACTS = [
    {
        "prompt": "The capital of France is",
        "subject": "France",
        "original_answer": "Paris",
        "edited_answer": "Lyon",
        "edit_fact": "The capital of France is Lyon",
        "original_fact": "The capital of France is Paris",
    },
    {
        "prompt": "Hamlet was written by",
        "subject": "Hamlet",
        "original_answer": "William Shakespeare",
        "edited_answer": "Charles Dickens",
        "edit_fact": "Hamlet was written by Charles Dickens",
        "original_fact": "Hamlet was written by William Shakespeare",
    },
    {
        "prompt": "The iPhone is made by",
        "subject": "iPhone",
        "original_answer": "Apple",
        "edited_answer": "Nokia",
        "edit_fact": "The iPhone is made by Nokia",
        "original_fact": "The iPhone is made by Apple",
    },
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as training leaves it: config.yaml + adapter/ (LoRA with random B)."""
    from contraq.run.parts import Parts

    root = tmp_path_factory.mktemp("tiny_run")
    nli_dir = root / "nli"
    torch.manual_seed(0)  # Parts below draws LoRA A from the global generator
    save_tiny_nli(nli_dir, {0: "entailment", 1: "neutral", 2: "contradiction"}, num_layers=1)

    data = root / "facts.jsonl"
    # 12 subjects: the split by subject leaves facts for training, validation and test.
    rows = [{**f, "subject": f"{f['subject']} {k}"} for k in range(4) for f in FACTS]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = root / "run"
    run.mkdir()
    cfg = tiny_config(nli_dir, data)
    from omegaconf import OmegaConf

    OmegaConf.save(OmegaConf.create(cfg), run / "config.yaml")
    parts = Parts(OmegaConf.create(cfg))
    randomize_lora_b(parts.policy, seed=1)
    parts.policy.save_pretrained(str(run / "adapter"))
    return run


def write_minimal_facts(path: Path) -> Path:
    rows = [
        {
            "subject": "France",
            "edit_fact": "The capital of France is Lyon",
            "original_answer": "Paris",
        },
        {"subject": "Hamlet", "edit_fact": "Hamlet was written by Charles Dickens"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_resolve_run(tiny_run: Path, tmp_path: Path) -> None:
    assert resolve_run(tiny_run).run_dir == tiny_run.resolve()
    assert resolve_run(tiny_run / "adapter").run_dir == tiny_run.resolve()
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(exist_ok=True)
    ckpt.write_bytes(b"")
    ref = resolve_run(ckpt)
    assert ref.run_dir == tiny_run.resolve() and ref.ckpt == ckpt.resolve()
    with pytest.raises(RunError, match="no config.yaml"):
        resolve_run(tmp_path)
    with pytest.raises(RunError, match="no such"):
        resolve_run(tmp_path / "missing")


def test_eval_facts_from_either_split(tiny_run: Path) -> None:
    """With no facts file, eval takes the run's test split (its label unchanged, so earlier
    eval folders stay reusable) or, with split=val, the validation split: disjoint facts."""
    from contraq.data import load_facts, split_facts
    from contraq.evaluation.methods import eval_facts
    from contraq.run.load import heldout_facts

    parts = load_parts(resolve_run(tiny_run), device=torch.device("cpu"))
    data = tiny_run.parent / "facts.jsonl"
    split = split_facts(load_facts(data), 0.2, 0.4, 0)
    test, test_label = eval_facts(parts, None, 0)
    val, val_label = eval_facts(parts, None, 0, "val")
    assert [f.subject for f in test] == [f.subject for f in split.test]
    assert [f.subject for f in val] == [f.subject for f in split.val]
    assert not {f.subject for f in test} & {f.subject for f in val}
    assert test_label == f"{data} (held-out test split)"
    assert val_label == f"{data} (validation split)"
    assert len(eval_facts(parts, None, 1, "val")[0]) == 1
    with pytest.raises(RunError, match="split='train': expected one of"):
        heldout_facts(parts.cfg, "train")


def test_sample_writes_scored_distinct_questions(tiny_run: Path, tmp_path: Path) -> None:
    facts = write_minimal_facts(tmp_path / "facts.jsonl")
    out = tmp_path / "q.jsonl"
    argv = ["sample", f"checkpoint={tiny_run}", f"facts={facts}", "n=5"]
    opts = ["device=cpu", "batch_size=4"]
    assert main([*argv, f"out={out}", *opts]) == 0
    rows = read_jsonl(out)
    assert len(rows) == 10
    for r in rows:
        assert set(r) >= {"subject", "edit_fact", "question", "answer", "log_r", "log_c", "log_pq"}
        assert math.isfinite(r["log_r"]) and r["log_c"] <= 0.0 and r["log_pq"] < 0.0
        assert r["question"].endswith("?") and isinstance(r["answer"], str)
        assert 1 <= r["n_actions"] <= 6
    for subject in ("France", "Hamlet"):
        qs = [r["question"] for r in rows if r["subject"] == subject]
        assert len(qs) == 5 and len({" ".join(q.split()).lower() for q in qs}) == 5
    assert {r["original_answer"] for r in rows} == {"Paris", None}
    # Same seed -> same questions (the sampler's generator is seeded).
    out2 = tmp_path / "q2.csv"
    assert main([*argv, f"out={out2}", *opts, "csv=true"]) == 0
    import csv

    with out2.open() as fh:
        csv_rows = list(csv.DictReader(fh))
    assert [r["question"] for r in csv_rows] == [r["question"] for r in rows]


def test_sample_draws_distinct_questions_when_the_policy_repeats(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """At T=1e-4 independent draws would all repeat the greedy question; drawn without
    replacement, each fact gets n distinct questions (the greedy one first), each marked
    counted or not with its near-duplicate group, and the counts are printed."""
    facts = write_minimal_facts(tmp_path / "facts.jsonl")
    out = tmp_path / "q.jsonl"
    argv = ["sample", f"checkpoint={tiny_run / 'adapter'}", f"facts={facts}", "device=cpu"]
    assert main([*argv, f"out={out}", "n=3", "temperature=1e-4"]) == 0
    rows = read_jsonl(out)
    for subject in ("France", "Hamlet"):
        mine = [r for r in rows if r["subject"] == subject]
        assert len(mine) == 3
        assert len({tuple(r["question"].split()) for r in mine}) == 3
        assert [r["group"] for r in mine][0] == 0 and max(r["group"] for r in mine) <= 2
        assert all(r["counted"] == bool(r["genuine"]) for r in mine)
    printed = capsys.readouterr().out
    assert "distinct counted contradictions over 2 facts" in printed
    assert "(France): " in printed
    greedy = [r["question"] for r in rows][::3]
    # --plain gives the base LM's (different) greedy question.
    out_plain = tmp_path / "plain.jsonl"
    code = main([*argv, f"out={out_plain}", "n=1", "temperature=1e-4", "plain=true"])
    assert code == 0
    plain = read_jsonl(out_plain)
    assert [r["question"] for r in plain] != greedy


def test_first_new_content_answers_no_rephrasing_of_function_words() -> None:
    rows = [0, 1, 2, 3, 4, 5, 6]
    texts = [
        "What is the capital of France?",
        "What's the capital of France?",  # same content words: skipped
        "Which city is France's capital?",
        "What is the capital of France?",  # another fact: its own first
        "Is Lyon the capital of France?",
        "Where is the capital of France?",  # same content words again: skipped
        "Who leads France?",  # the group already has n = 3
    ]
    groups = [0, 0, 0, 1, 0, 0, 0]
    assert first_new_content(rows, texts, groups, 3) == [0, 2, 3, 4]
    assert first_new_content(rows, texts, groups, 1) == [0, 3]


def test_sample_draw_factor_answers_n_questions_with_new_content_words(
    tiny_run: Path, tmp_path: Path
) -> None:
    """draw_factor=3: 3n draws without replacement, the first n with new content words are
    answered (each fact's questions then have n distinct content keys); out of range: one
    line naming the key."""
    facts = write_minimal_facts(tmp_path / "facts.jsonl")
    argv = ["sample", f"checkpoint={tiny_run}", f"facts={facts}", "device=cpu", "n=4"]
    out = tmp_path / "q.jsonl"
    assert main([*argv, f"out={out}", "draw_factor=3"]) == 0
    rows = read_jsonl(out)
    for subject in ("France", "Hamlet"):
        qs = [r["question"] for r in rows if r["subject"] == subject]
        assert 1 <= len(qs) <= 4 and len({content_key(q) for q in qs}) == len(qs)
    assert main([*argv, f"out={tmp_path / 'x.jsonl'}", "draw_factor=0.5"]) == 2
    assert not (tmp_path / "x.jsonl").exists()


@pytest.mark.parametrize(
    ("content", "where"),
    [
        ('{"subject": "A", "edit_fact": "A is B"}\n{"subject": "C"}\n', "facts.jsonl:2: edit_fact"),
        (
            '{"subject": "A", "edit_fact": "A is B"}\n{"subject": "C", "edit_fact": "C is D"}\n{bad json\n',
            "facts.jsonl:3",
        ),
    ],
)
def test_sample_bad_facts_name_the_line(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, where: str
) -> None:
    facts = tmp_path / "facts.jsonl"
    facts.write_text(content)
    argv = ["sample", f"checkpoint={tiny_run}", f"facts={facts}", f"out={tmp_path / 'q.jsonl'}"]
    assert main(argv) == 2
    assert where in capsys.readouterr().err
    assert not (tmp_path / "q.jsonl").exists()


def test_sample_bad_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    facts = write_minimal_facts(tmp_path / "facts.jsonl")
    argv = ["sample", f"checkpoint={tmp_path}", f"facts={facts}", f"out={tmp_path / 'q'}"]
    assert main(argv) == 2
    assert "no config.yaml" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_on_heldout_split(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval"
    # judge=: the same tiny judge copied elsewhere replaces the run's for every method.
    import shutil

    judge = tmp_path / "other_judge"
    shutil.copytree(tiny_run.parent / "nli", judge)
    settings = ["n=4", "temperatures=[1.5]", "beam_groups=2", "batch_size=8", "max_facts=2"]
    argv = ["eval", f"checkpoint={tiny_run}", f"out={out}", f"judge={judge}", "device=cpu"]
    assert main([*argv, *settings]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["settings"]["judge"] == str(judge)
    assert result["settings"]["dtype"] == "float32"  # the weights as loaded (tiny: float32)
    assert set(result["comparisons"]) == set(result["summary"]) - {"trained"}
    assert result["frontier"]["diversity"] == result["summary"]["trained"]["diversity"]
    summary = result["summary"]
    assert list(summary)[:4] == ["trained", "trained_distinct", "untrained", "untrained_T1.5"]
    beam = [m for m in summary if "beam" in m]
    assert len(beam) == 1
    for name, m in summary.items():
        assert m["n_questions"] == 8 and m["n_facts"] == 2, name
        assert 0.0 <= m["contradiction_rate"] <= 1.0 and m["mean_log_c"] <= 0.0
        assert 0.0 <= m["distinct_2"] <= 1.0 and m["mean_length"] >= 2.0
        assert math.isfinite(m["diversity"])
        for key in ("genuine_rate", "question_rate", "echo_rate"):
            assert 0.0 <= m[key] <= 1.0, (name, key)
        assert m["genuine_rate_low"] <= m["genuine_rate"] <= m["genuine_rate_high"]
    # Beam search returns n distinct beams per fact.
    qs = read_jsonl(out / "questions.jsonl")
    assert len(qs) == 8 * len(summary)
    for fact in (0, 1):
        beams = [r["question"] for r in qs if r["method"] == beam[0] and r["fact_index"] == fact]
        assert len(beams) == 4
    # The held-out split: every question belongs to a test-split fact.
    from contraq.data import load_facts, split_facts

    test = split_facts(load_facts(tiny_run.parent / "facts.jsonl"), 0.2, 0.4, 0).test
    assert {r["subject"] for r in qs} <= {f.subject for f in test}
    md = (out / "eval.md").read_text()
    assert "| trained | 8 |" in md and "reward_distribution.png" in md
    for png in ("reward_distribution.png", "reward_vs_diversity.png", "rate_vs_diversity.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # workers=1: the same records from one process at the workers' thread count (workers=2,
    # the default, split the methods over this process and one more).
    from contraq.threads import torch_threads, usable_cores

    alone = tmp_path / "one_process"
    with torch_threads(max(1, usable_cores() // 2)):
        assert main([*argv[:2], f"out={alone}", *argv[3:], *settings, "workers=1"]) == 0
    assert read_jsonl(alone / "questions.jsonl") == qs
    assert any(n.startswith("2 processes") for n in result["settings"]["notes"])
    notes = json.loads((alone / "eval.json").read_text())["settings"]["notes"]
    assert not any("processes" in n for n in notes)
    # baselines_from: the untrained and beam records are taken over, not drawn again.
    reuse = tmp_path / "reuse"
    argv_reuse = [*argv[:2], f"out={reuse}", *argv[3:], *settings, f"baselines_from={out}"]
    assert main(argv_reuse) == 0
    reused = json.loads((reuse / "eval.json").read_text())
    assert reused["settings"]["baselines_from"] == str(out)
    assert read_jsonl(reuse / "questions.jsonl") == qs  # the same seed: the same trained questions
    for name, m in summary.items():
        assert reused["summary"][name]["genuine_rate"] == m["genuine_rate"], name
    changed = [*argv[:2], f"out={tmp_path / 'x'}", *argv[3:], *settings, "n=3"]
    assert main([*changed, f"baselines_from={out}"]) == 2
    assert not (tmp_path / "x" / "eval.json").exists()
    # The validation split's facts differ: the test split's baselines are refused, though
    # max_facts gives both the same number of facts.
    other_split = [*argv[:2], f"out={tmp_path / 'v'}", *argv[3:], *settings, "split=val"]
    capsys.readouterr()
    assert main([*other_split, f"baselines_from={out}"]) == 2
    assert capsys.readouterr().err.rstrip().endswith("differs from this evaluation in: facts")
    assert not (tmp_path / "v" / "eval.json").exists()
    # trained_temperatures: the trained policy tempered too, compared with its peers.
    tempered = tmp_path / "tempered"
    argv_t = [*argv[:2], f"out={tempered}", *argv[3:], *settings, f"baselines_from={out}"]
    # trained_distinct: the trained policy drawn without replacement, n distinct per fact;
    # untrained_distinct is a baseline (reused), so it needs an eval that drew it.
    assert main([*argv_t, "trained_temperatures=[1.5]", "trained_distinct=true"]) == 0
    res_t = json.loads((tempered / "eval.json").read_text())
    assert list(res_t["summary"])[:3] == ["trained", "trained_T1.5", "trained_distinct"]
    assert set(res_t["matched"]["trained_T1.5"]) == {"untrained_T1.5", "untrained", beam[0]}
    assert set(res_t["matched"]["trained_distinct"]) == {"untrained", beam[0]}
    assert res_t["summary"]["trained_T1.5"]["n_questions"] == 8
    assert res_t["settings"]["trained_distinct"] is True
    distinct = [
        r for r in read_jsonl(tempered / "questions.jsonl") if r["method"] == "trained_distinct"
    ]
    for fact in (0, 1):
        qs_f = [tuple(r["question"].split()) for r in distinct if r["fact_index"] == fact]
        assert len(qs_f) == 4 and len(set(qs_f)) == 4
    # The set per fact at each budget, the trained policy drawn distinct against the others.
    assert res_t["yield"]["target"] == "trained_distinct"
    assert set(res_t["yield"]["methods"]["beam"]) == {"2", "4"}  # budgets: 2, 4 = n
    for cells in res_t["yield"]["methods"].values():
        for kind in ("distinct", "clusters"):
            assert 0 <= cells["2"][kind]["mean"] <= cells["4"][kind]["mean"] <= 4
    assert "## The set per fact" in (tempered / "eval.md").read_text()
    assert (tempered / "yield.png").read_bytes()[:4] == b"\x89PNG"
    # budgets above n are refused in one line.
    capsys.readouterr()
    assert main([*argv_t, "budgets=[2,5]"]) == 2
    assert "budgets: must each lie in [1, n=4]" in capsys.readouterr().err
    md = (tempered / "eval.md").read_text()
    assert "## trained_T1.5" in md and "## trained_distinct (n distinct questions" in md
    # `contraq rescore` with the judge that scored them gives every metric back.
    again = tmp_path / "rescored"
    assert main(["rescore", f"records={out}", f"judge={judge}", f"out={again}"]) == 0
    redone = json.loads((again / "eval.json").read_text())
    assert redone["settings"]["rescored_from"] == str(out)
    assert redone["comparisons"] == result["comparisons"]
    for name, m in summary.items():
        got = {k: v for k, v in redone["summary"][name].items() if k != "seconds"}
        assert got == pytest.approx({k: v for k, v in m.items() if k != "seconds"}), name


def test_lora_from_a_lightning_checkpoint(tiny_run: Path, tmp_path: Path) -> None:
    """A .ckpt holds the trainable tensors under ``policy.`` (GFlowNetModule.on_save_checkpoint);
    loading it must give exactly those LoRA weights, and a foreign checkpoint must be refused."""
    from safetensors.torch import load_file

    adapter = load_file(str(tiny_run / "adapter" / "adapter_model.safetensors"))
    ref = load_parts(resolve_run(tiny_run), device=torch.device("cpu"))
    state = {
        f"policy.{n}": p.detach().clone() * 2.0
        for n, p in ref.policy.named_parameters()
        if "lora_" in n
    }
    assert len(state) == len(adapter) > 0
    ckpt = tiny_run / "checkpoints" / "step=2.ckpt"
    ckpt.parent.mkdir(exist_ok=True)
    torch.save({"state_dict": {**state, "log_z_head.proj.weight": torch.zeros(1)}}, ckpt)
    parts = load_parts(resolve_run(ckpt), device=torch.device("cpu"))
    got = {f"policy.{n}": p for n, p in parts.policy.named_parameters() if "lora_" in n}
    assert got.keys() == state.keys()
    assert all(torch.equal(got[k], state[k]) for k in state)
    bad = tiny_run / "checkpoints" / "bad.ckpt"
    torch.save({"state_dict": {"policy.something.else": torch.zeros(1)}}, bad)
    with pytest.raises(RunError, match="do not match"):
        load_parts(resolve_run(bad), device=torch.device("cpu"))


def test_split_methods_deals_every_method_once() -> None:
    from contraq.evaluation.methods import split_methods

    names = ["trained", "trained_T0.7", "untrained", "untrained_T0.5", "untrained_T0.7", "beam"]
    for workers in (1, 2, 3, 10):
        groups = split_methods(names, workers)
        assert sorted(m for g in groups for m in g) == sorted(names)
        assert len(groups) <= workers and all(groups)
        assert groups[0][:2] == ["trained", "trained_T0.7"]  # this process runs the trained
    # Costliest baseline (beam) first, to the idle worker; then to whichever has least.
    assert split_methods(names[:1] + names[2:], 2) == [
        ["trained", "untrained", "untrained_T0.7"],
        ["beam", "untrained_T0.5"],
    ]
    assert split_methods(["trained"], 2) == [["trained"]]


def test_a_failed_eval_worker_is_an_error_with_its_log(tmp_path: Path) -> None:
    import subprocess
    import sys

    from contraq.evaluation.methods import _collect

    (tmp_path / "spec.json").write_text(json.dumps({"methods": ["beam"]}))
    with (tmp_path / "worker.log").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; print('out of memory'); sys.exit(3)"],
            stdout=log,
            stderr=log,
        )
    with pytest.raises(RuntimeError, match=r"(?s)methods \['beam'\]\) exited 3.*out of memory"):
        _collect(tmp_path, proc, {}, {}, [])


def test_eval_questions_file_is_one_more_method(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`questions=FILE`: every method runs on the file's facts, and its questions, scored by
    the run's reward in file order, are the method `file`; a bad row is one line."""
    france = {"subject": "France", "edit_fact": "The capital of France is Lyon"}
    hamlet = {"subject": "Hamlet", "edit_fact": "Hamlet was written by Goethe"}
    asked = [
        (france, "What is the capital of France?"),
        (france, "Which city is France's capital?"),
        (hamlet, "Who wrote Hamlet?"),
    ]
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps({**f, "question": q}) + "\n" for f, q in asked))
    out = tmp_path / "eval"
    argv = ["eval", f"checkpoint={tiny_run}", f"questions={qfile}", "device=cpu", "workers=1"]
    opts = ["n=2", "trained=false", "trained_distinct=false", "untrained_distinct=true"]
    opts += ["beam=false", "temperatures=[]"]
    assert main([*argv, f"out={out}", *opts, "budgets=[1,2]"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert list(result["summary"]) == ["untrained", "untrained_distinct", "file"]
    assert result["settings"]["n_facts"] == 2 and result["settings"]["facts"] == str(qfile)
    got = [r for r in read_jsonl(out / "questions.jsonl") if r["method"] == "file"]
    assert [(r["fact_index"], r["question"]) for r in got] == [
        (0, "What is the capital of France?"),
        (0, "Which city is France's capital?"),
        (1, "Who wrote Hamlet?"),
    ]
    assert all(isinstance(r["answer"], str) and r["log_c"] <= 0 for r in got)
    assert set(result["yield"]["methods"]["file"]) == {"1", "2"}
    assert result["yield"]["target"] is None and result["yield"]["compare"] == {}
    # A row without its question, and facts= beside questions=, are refused in one line.
    qfile.write_text(
        json.dumps({**france, "question": "Where?"}) + "\n" + json.dumps(hamlet) + "\n"
    )
    capsys.readouterr()
    assert main([*argv, f"out={tmp_path / 'bad'}", *opts]) == 2
    assert f"{qfile}:2: field 'question'" in capsys.readouterr().err
    facts = write_minimal_facts(tmp_path / "facts.jsonl")
    assert main([*argv, f"facts={facts}", f"out={tmp_path / 'both'}", *opts]) == 2
    assert "questions: takes its facts from the file" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists() and not (tmp_path / "both").exists()
