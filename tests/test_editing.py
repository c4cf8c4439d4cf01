"""`contraq edit` and `contraq probe` on the tiny random model: the in-context editor, the
fine-tuning editor's two terms, the checks on edited models made elsewhere, the questions
file's refusals, and one whole edit -> probe run through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from contraq.data import load_facts
from contraq.editing.editors import FTSettings, fit_ft
from contraq.editing.models import EditedModelError, check_adapter, check_hf_folder
from contraq.editing.probe import Answerer, read_questions
from contraq.editing.scores import control_logprobs, encode_rows, kl_to_base, score_targets
from contraq.lm.models import ModelConfig, attach_lora, build_tiny_model, load_model_and_tokenizer
from contraq.reward.contradiction import ContradictionRewardConfig

REPO = Path(__file__).resolve().parents[1]
TINY = ModelConfig(source="tiny")
CF = REPO / "data" / "counterfact_1000.jsonl"


def _facts_file(tmp_path: Path, lines: list[int]) -> Path:
    rows = CF.read_text().splitlines()
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(rows[i - 1] + "\n" for i in lines))
    return path


def _questions(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text(
        "".join(
            json.dumps({"subject": s, "edit_fact": f, "question": q, "method": "hand"}) + "\n"
            for s, f, q in [(f.split(" ")[0], f, q) for f, q in rows]
        )
    )
    return path


def _contraq(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("CONTRAQ_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "contraq.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_in_context_edit_is_the_answer_prompt_with_the_edit_stated_first():
    model, tok = load_model_and_tokenizer(TINY)
    cfg = ContradictionRewardConfig(answer_max_new_tokens=6)
    answerer = Answerer(tok, cfg)
    question = "What is the mother tongue of Danielle Darrieux?"
    context = "New fact: The mother tongue of Danielle Darrieux is English."
    with answerer.stating(context):
        prompt = answerer.answer_prompt(question)
        rows = answerer._prompt_rows([question])
    assert answerer.cfg is cfg  # the context was for that call only
    assert context in prompt and prompt.index(context) < prompt.index(question)
    ap = cfg.answer_prompt
    stated = ContradictionRewardConfig(
        answer_prompt=type(ap)(chat_template_text=f"{context}\n{ap.chat_template_text}")
    )
    assert prompt == Answerer(tok, stated).answer_prompt(question)
    with torch.no_grad():
        first = model(torch.tensor(rows)).logits[0, -1]
        plain = model(torch.tensor(answerer._prompt_rows([question]))).logits[0, -1]
    assert not torch.allclose(first, plain, atol=1e-4)  # the stated edit reaches the answer


@pytest.mark.slow
def test_in_context_edit_changes_smollm2s_answer_where_the_prompt_decides_it():
    model, tok = load_model_and_tokenizer(ModelConfig(source="smollm2", dtype="float32"))
    answerer = Answerer(tok, ContradictionRewardConfig(answer_max_new_tokens=20))
    question = "What is the mother tongue of Danielle Darrieux?"
    context = "New fact: The mother tongue of Danielle Darrieux is English."
    plain = answerer.answer([question], model)[0]
    edited = answerer.answer([question], model, context)[0]
    assert "French" in plain and "English" not in plain
    assert "English" in edited and "French" not in edited


def _ft(kl_weight: float, facts, control) -> tuple[float, float, float]:
    """(target log-prob before, after, control KL after) of one FT edit of a fresh tiny LM
    (weights at std 0.2: peaked enough that a LoRA can move its next-token distributions)."""
    tok = load_model_and_tokenizer(TINY)[1]
    model = build_tiny_model("llama", tok, init_std=0.2)
    rows = encode_rows(tok, [f.prompt for f in facts], [f.edited_answer for f in facts])
    before = sum(s.logprob for s in score_targets(model, rows, tok.pad_token_id))
    s = FTSettings(
        lr=3e-2,
        steps=12,
        kl_weight=kl_weight,
        lora_r=8,
        lora_alpha=16,
        target_modules=None,
        control="",
        n_control=len(control),
        kl_positions=6,
        seed=0,
    )
    lm, history = fit_ft(model, tok, facts, control, s, TINY)
    assert len(history) == 12
    after = sum(s.logprob for s in score_targets(lm, rows, tok.pad_token_id))
    seqs = [tok(f.original_fact)["input_ids"] for f in control]
    with torch.no_grad():
        with lm.disable_adapter():
            base_lp, mask = control_logprobs(lm, seqs, tok.pad_token_id, 6)
        logp, _ = control_logprobs(lm, seqs, tok.pad_token_id, 6)
    return before, after, float(kl_to_base(base_lp, logp, mask))


def test_ft_edit_raises_the_new_object_and_keeps_control_prompts_close():
    facts = load_facts(CF)
    edits, control = facts[:2], facts[10:18]
    before, after, kl = _ft(20.0, edits, control)
    assert after > before + 20.0  # nats, summed over the new objects' tokens (-26 -> -0.9)
    _, after_free, kl_free = _ft(0.0, edits, control)
    assert after_free > before + 20.0
    assert kl < 0.15 and kl < kl_free / 10  # the KL term keeps them close (0.09 vs 2.5)


def _adapter(tmp_path: Path, arch: str, **kw) -> Path:
    tok = load_model_and_tokenizer(TINY)[1]
    policy = attach_lora(
        build_tiny_model(arch, tok, **kw), ModelConfig(source="tiny", tiny_arch=arch)
    )
    policy.save_pretrained(str(tmp_path / f"adapter-{arch}"))
    return tmp_path / f"adapter-{arch}"


def test_adapter_or_folder_of_another_base_is_refused(tmp_path):
    base, tok = load_model_and_tokenizer(TINY)
    check_adapter(_adapter(tmp_path, "llama"), base, tok)  # its own base fits
    with pytest.raises(EditedModelError, match="another base LM.*has no module"):
        check_adapter(_adapter(tmp_path, "gpt2"), base, tok)
    wide = tmp_path / "wide"
    wide.mkdir()
    other = _adapter(wide, "llama", hidden_size=96)
    with pytest.raises(
        EditedModelError, match=r"\[8, 96\] does not fit model\.layers\.0\.self_attn\.\w+ \(64 -> "
    ):
        check_adapter(other, base, tok)
    gpt2 = build_tiny_model("gpt2", tok)
    gpt2.save_pretrained(str(tmp_path / "gpt2"))
    with pytest.raises(EditedModelError, match="model_type='gpt2', the base has 'llama'"):
        check_hf_folder(tmp_path / "gpt2", base, tok)


def test_cli_refuses_an_adapter_for_another_base_in_one_line(tmp_path, tiny_nli_dir):
    questions = _questions(tmp_path / "q.jsonl", [("A is B", "What is A?")])
    done = _contraq(
        "probe",
        f"edited={_adapter(tmp_path, 'gpt2')}",
        f"questions={questions}",
        f"out={tmp_path / 'p'}",
        "facts=" + str(_facts_file(tmp_path, [1])),
        "model=tiny",
        f"nli.path={tiny_nli_dir}",
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "an adapter for another base LM" in lines[0], lines
    assert not (tmp_path / "p").exists()


def test_questions_for_facts_the_edit_does_not_know_are_refused(tmp_path, tiny_nli_dir):
    facts_path = _facts_file(tmp_path, [1, 2])
    facts = load_facts(facts_path)
    questions = _questions(
        tmp_path / "q.jsonl",
        [(facts[0].edit_fact, "What is it?"), ("Paris is the capital of Italy", "Where?")],
    )
    with pytest.raises(ValueError, match=rf"{questions}:2: edit_fact 'Paris is the capital"):
        read_questions(questions, facts, "in_context")
    done = _contraq(
        "probe",
        "edited=in_context",
        f"questions={questions}",
        f"out={tmp_path / 'p'}",
        f"facts={facts_path}",
        "model=tiny",
        f"nli.path={tiny_nli_dir}",
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{questions}:2: edit_fact" in lines[0], lines


def test_edit_then_probe_writes_the_adapter_the_records_and_the_table(tmp_path, tiny_nli_dir):
    facts_path = _facts_file(tmp_path, [1, 2, 3])
    facts = load_facts(facts_path)
    edit = tmp_path / "edit"
    done = _contraq(
        "edit",
        f"facts={facts_path}",
        f"out={edit}",
        "model=tiny",
        "ft.steps=3",
        "ft.n_control=4",
    )
    assert done.returncode == 0, done.stderr
    record = json.loads((edit / "edit.json").read_text())
    assert record["editor"] == "ft" and len(record["history"]) == 3
    assert set(record["metrics"]) == {"efficacy", "generalisation", "locality", "locality_kept"}
    assert (edit / "adapter" / "adapter_model.safetensors").is_file()
    questions = _questions(
        tmp_path / "q.jsonl", [(f.edit_fact, f"Who is {f.subject}?") for f in facts] * 2
    )
    probe = tmp_path / "probe"
    done = _contraq(
        "probe",
        f"edited={edit}",
        f"questions={questions}",
        f"out={probe}",
        f"nli.path={tiny_nli_dir}",
    )
    assert done.returncode == 0, done.stderr
    rows = [json.loads(x) for x in (probe / "probe.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {r["fact_index"] for r in rows} == {0, 1, 2}
    assert all(0.0 <= r["p_contradiction"] <= 1.0 and isinstance(r["fails"], bool) for r in rows)
    per_fact = [json.loads(x) for x in (probe / "probe_facts.jsonl").read_text().splitlines()]
    assert [f["questions"]["hand"]["n"] for f in per_fact] == [2, 2, 2]
    md = (probe / "probe.md").read_text()
    assert "| questions: hand | 3 | 2 |" in md and "rephrase prompt (generalisation)" in md
    assert (probe / "probe.png").stat().st_size > 0
    again = _contraq(
        "probe",
        f"edited={edit}",
        f"questions={questions}",
        f"out={probe}",
        f"nli.path={tiny_nli_dir}",
    )
    assert again.returncode == 2 and "exists" in again.stderr
