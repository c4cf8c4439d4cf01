"""Rewards (contraq.reward) on tiny random LMs and a tiny random BERT NLI judge.

Random weights are enough for the mechanics: every expected value is recomputed here the slow
way (one question or one prefix at a time, without padding).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from transformers import AutoTokenizer

from contraq.config.schema import compose_run
from contraq.data import EditFact
from contraq.genuine import echo_flags
from contraq.judge.scorer import NLIScorer
from contraq.lm.embedding import group_novelty, pairwise_diversity
from contraq.lm.models import (
    ModelConfig,
    attach_lora,
    base_model,
    build_tiny_model,
    termination_token_id,
)
from contraq.lm.sampling import SampleBatch, token_logprobs
from contraq.reward.answers import first_line
from contraq.reward.base import question_lengths
from contraq.reward.build import build_reward
from contraq.reward.combine import combine_log_reward, counted_log_c
from contraq.reward.contradiction import (
    ContradictionReward,
    ContradictionRewardConfig,
    counted_log_r,
    novelty_credit,
)
from contraq.reward.likelihood import LikelihoodReward

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

PROMPTS = [
    "Ask one short question about Marie Curie.",
    "Ask about Apple.",
    "Ask one short question about the province of Quebec in Canada.",
    "Question:",
    "Ask one short question about Lionel Messi.",
    "Ask a question about Moby Dick.",
    "Ask one short question about the Second World War, please.",
    "Ask about Paris.",
]
QUESTIONS = [
    "Where was Marie Curie born",
    "Who is the CEO of Apple",
    "What language do people speak in Quebec",
    "Why",
    "Which team does Messi play for",
    "Who wrote the famous novel about a whale",
    "When did the war end",
    "What is the capital of France",
]


def make_batch(
    tokenizer, prompts: list[str], questions: list[list[int]], pad_id: int
) -> SampleBatch:
    """Left-padded prompts, actions padded with ``pad_id`` after each question."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    assert tokenizer.padding_side == "left"
    width = max(len(q) for q in questions)
    actions = torch.full((len(questions), width), pad_id, dtype=torch.long)
    for i, q in enumerate(questions):
        actions[i, : len(q)] = torch.tensor(q)
    lengths = torch.tensor([len(q) for q in questions])
    zeros = torch.zeros(actions.shape)
    return SampleBatch(enc["input_ids"], enc["attention_mask"], actions, lengths, zeros, zeros)


def batch_rows(batch: SampleBatch, n: int) -> SampleBatch:
    """The first ``n`` rows."""
    return SampleBatch(*(getattr(batch, k)[:n] for k in batch.__dataclass_fields__))


def question_ids(tokenizer, texts: list[str], term: int) -> list[list[int]]:
    return [tokenizer.encode(t, add_special_tokens=False) + [term] for t in texts]


def facts_for(n: int) -> list[EditFact]:
    return [EditFact(subject=f"s{i}", edit_fact=f"Subject {i} was born in Rome.") for i in range(n)]


def brute_log_p(model: nn.Module, prompt: list[int], tokens: list[int]) -> float:
    """log P(tokens | prompt) of ``model``: one unpadded sequence, default positions."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    n = len(prompt)
    return float(sum(logp[n - 1 + j, tok] for j, tok in enumerate(tokens)))


def real_prompt(batch: SampleBatch, b: int) -> list[int]:
    return batch.prompt_ids[b][batch.prompt_mask[b].bool()].tolist()


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models are all per-op overhead: on a shared CPU two intra-op threads made these
    tests ~30x slower (measured: 5 s vs 0.15 s for one batch of answers)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def term(smol_tokenizer) -> int:
    return termination_token_id(smol_tokenizer, "?")


@pytest.fixture()
def nli(tiny_nli_dir: Path) -> NLIScorer:
    """The tiny random judge of conftest (contradiction index 1, not the usual 2)."""
    return NLIScorer(tiny_nli_dir, device="cpu", batch_size=64)


@pytest.fixture(scope="module")
def answering_lm(smol_tokenizer) -> nn.Module:
    """A tiny GPT-2 policy whose greedy answers vary with the question and sometimes contain
    newlines: untied random output layer (a tied tiny model only repeats its last input
    token), the newline row scaled up so it wins at some positions."""
    model = build_tiny_model("gpt2", smol_tokenizer, seed=0)
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(model.lm_head.weight.shape, generator=gen) * 0.3
    newline = smol_tokenizer.encode("\n", add_special_tokens=False)[0]
    weight[newline] = weight[newline] / weight[newline].norm() * 8.0
    model.lm_head.weight = nn.Parameter(weight)
    policy = attach_lora(model, ModelConfig(source="tiny", tiny_arch="gpt2"))
    policy.eval()
    return policy


@contextlib.contextmanager
def count_calls(obj: object, name: str) -> Iterator[list[int]]:
    """Counts calls of ``obj.name`` (the real method still runs)."""
    original = getattr(obj, name)
    calls: list[int] = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    setattr(obj, name, wrapper)
    try:
        yield calls
    finally:
        delattr(obj, name)  # back to the class method


def contradiction(policy, tok, nli, term, embedder=None, **cfg) -> ContradictionReward:
    base = {
        "w_lik": 0.05,
        "min_len": 0,
        "batch_size": 8,
        "answer_max_new_tokens": 16,  # enough for the fixture's newlines, cheap
        "answer_prompt": {"style": "chat"},
        # The raw composition log C + w_lik log P_Q; the genuine-form gate has its own tests.
        "count_only_genuine": False,
        "judge_question": False,
        "log_c_floor": -1e9,
        # The policy's own weights: compared with brute force on the float model below (the
        # quantised copies have tests/test_frozen_weights.py).
        "frozen_weights": "shared",
    }
    base.update(cfg)
    return ContradictionReward(policy, tok, nli, base, term, embedder)


# --------------------------------------------------------------------------- pure parts


def test_first_line() -> None:
    assert first_line(" The capital is Rome.\nQ: next") == "The capital is Rome."
    assert first_line("\n  He was born in Paris. \nmore") == "He was born in Paris."
    assert first_line("no newline  ") == "no newline"
    assert first_line("") == ""


def test_question_lengths_ignore_padding_equal_to_termination() -> None:
    term = 7
    # Padding IS the termination token here (the seed counted it): lengths decide.
    actions = torch.tensor([[1, 2, 7, 7, 7], [1, 2, 3, 4, 7], [1, 2, 3, 4, 5]])
    lengths = torch.tensor([3, 5, 5])
    # The last row was cut without termination: all 5 tokens are question tokens.
    assert question_lengths(actions, lengths, term).tolist() == [2, 4, 5]


def test_combine_log_reward_catches_nonfinite_and_min_len() -> None:
    log_c = torch.tensor([-0.5, float("nan"), -1.0, -2.0])
    log_pq = torch.tensor([-20.0, -20.0, float("-inf"), -30.0])
    n_tok = torch.tensor([6, 6, 6, 2])
    log_r, n_bad = combine_log_reward(log_c, log_pq, n_tok, w_lik=0.1, min_len=3, min_log_r=-50.0)
    assert log_r.tolist() == pytest.approx([-0.5 - 2.0, -50.0, -50.0, -50.0])
    assert n_bad.tolist() == [0.0, 1.0, 1.0, 0.0]
    assert torch.isfinite(log_r).all()


# --------------------------------------------------------------------------- likelihood reward


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_likelihood_terminal_and_prefixes_equal_brute_force(
    arch, request, smol_tokenizer, term
) -> None:
    policy = request.getfixturevalue(arch)
    tok = smol_tokenizer
    # Pad with the termination token: padding must never enter log P_Q.
    batch = make_batch(tok, PROMPTS[:5], question_ids(tok, QUESTIONS[:5], term), pad_id=term)
    reward = LikelihoodReward(policy, tok, term, min_len=2, min_log_r=-50.0)
    facts = facts_for(5)
    out = reward.terminal(facts, batch)
    prefix = reward.prefixes(facts, batch, min_len=2)
    assert prefix.shape == batch.actions.shape
    with base_model(policy) as lm:
        for b in range(5):
            n = int(batch.lengths[b])
            q = batch.actions[b, :n].tolist()
            expected = brute_log_p(lm, real_prompt(batch, b), q)
            if n - 1 < 2:  # "Why?" has one question token: below min_len
                assert out.log_r[b].item() == -50.0
            else:
                assert out.log_r[b].item() == pytest.approx(expected, abs=1e-4)
            assert out.components["log_pq"][b].item() == pytest.approx(expected, abs=1e-4)
            assert out.components["length"][b].item() == n - 1
            for t in range(prefix.shape[1]):
                if 2 <= t < n:
                    brute = brute_log_p(lm, real_prompt(batch, b), q[:t] + [term])
                    assert prefix[b, t].item() == pytest.approx(brute, abs=1e-4), (b, t)
                else:
                    assert prefix[b, t].item() == 0.0
            if n - 1 >= 2:  # the prefix at the termination step is the whole question
                assert prefix[b, n - 1].item() == pytest.approx(out.log_r[b].item(), abs=1e-5)
    assert out.questions[0] == "Where was Marie Curie born?"
    assert out.answers is None


def test_likelihood_uses_base_weights(tiny_llama, smol_tokenizer, term) -> None:
    tok = smol_tokenizer
    batch = make_batch(
        tok, PROMPTS[:3], question_ids(tok, QUESTIONS[:3], term), pad_id=tok.pad_token_id
    )
    reward = LikelihoodReward(tiny_llama, tok, term)
    before = reward.terminal(facts_for(3), batch).log_r
    before_prefix = reward.prefixes(facts_for(3), batch)
    lora = {n: p.detach().clone() for n, p in tiny_llama.named_parameters() if "lora_B" in n}
    args = (batch.prompt_ids, batch.prompt_mask, batch.actions, batch.lengths)
    policy_lp = token_logprobs(tiny_llama, *args)
    try:
        with torch.no_grad():
            for n, p in tiny_llama.named_parameters():
                if "lora_B" in n:
                    p.add_(torch.randn_like(p))
        # The change is real: the policy's log-probs move...
        assert not torch.allclose(token_logprobs(tiny_llama, *args), policy_lp, atol=1e-3)
        # ... the reward does not.
        torch.testing.assert_close(reward.terminal(facts_for(3), batch).log_r, before)
        torch.testing.assert_close(reward.prefixes(facts_for(3), batch), before_prefix)
    finally:
        with torch.no_grad():
            for n, p in tiny_llama.named_parameters():
                if n in lora:
                    p.copy_(lora[n])
    tiny_llama.train()  # as during training: the reward runs in eval mode, then restores it
    try:
        torch.testing.assert_close(reward.terminal(facts_for(3), batch).log_r, before)
        assert tiny_llama.training
    finally:
        tiny_llama.eval()


# --------------------------------------------------------------------------- contradiction reward


def test_contradiction_batches_generate_and_nli(answering_lm, smol_tokenizer, nli, term) -> None:
    tok = smol_tokenizer
    batch = make_batch(tok, PROMPTS, question_ids(tok, QUESTIONS, term), pad_id=tok.pad_token_id)
    reward = contradiction(answering_lm, tok, nli, term, batch_size=8)
    calls_before = nli.n_forward_calls
    with count_calls(reward, "greedy_continuations") as gen_calls:
        out = reward.terminal(facts_for(8), batch)
    assert len(gen_calls) == 1  # 8 questions, one batched greedy loop
    assert nli.n_forward_calls - calls_before == 1  # and one NLI forward
    assert out.log_r.shape == (8,)
    assert len(out.answers) == 8 and len(set(out.answers)) > 1
    # Halving batch_size halves the chunks: the count follows the config.
    reward.cfg.batch_size = 4
    with count_calls(reward, "greedy_continuations") as gen_calls:
        reward.terminal(facts_for(8), batch)
    assert len(gen_calls) == 2


def test_contradiction_log_r_is_composed_of_its_parts(
    answering_lm, smol_tokenizer, nli, term
) -> None:
    tok = smol_tokenizer
    batch = make_batch(
        tok, PROMPTS[:4], question_ids(tok, QUESTIONS[:4], term), pad_id=tok.pad_token_id
    )
    facts = facts_for(4)
    reward = contradiction(answering_lm, tok, nli, term, w_lik=0.1)
    out = reward.terminal(facts, batch)
    expected_c = nli.log_contradiction([f.edit_fact for f in facts], out.answers)
    torch.testing.assert_close(out.components["log_c"], expected_c)
    # The contradiction class is read from id2label (index 1 in this judge).
    probs = nli.probs([f.edit_fact for f in facts], out.answers)
    torch.testing.assert_close(out.components["log_c"].exp(), probs[:, 1])
    with base_model(answering_lm) as lm:
        for b in range(4):
            n = int(batch.lengths[b])
            pq = brute_log_p(lm, real_prompt(batch, b), batch.actions[b, :n].tolist())
            assert out.components["log_pq"][b].item() == pytest.approx(pq, abs=1e-4)
    torch.testing.assert_close(out.log_r, out.components["log_c"] + 0.1 * out.components["log_pq"])
    assert out.components["n_nonfinite"].tolist() == [0.0] * 4
    assert "log_pa" not in out.components


@pytest.mark.parametrize("style", ["chat", "fewshot"])
def test_left_padded_answers_equal_one_by_one_cut_at_newline(
    answering_lm, smol_tokenizer, nli, term, style
) -> None:
    tok = smol_tokenizer
    questions = [q + "?" for q in QUESTIONS]
    reward = contradiction(answering_lm, tok, nli, term, answer_prompt={"style": style})
    n_new = reward.cfg.answer_max_new_tokens
    raws = []
    with base_model(answering_lm) as lm:
        batched, _ = reward.generate_answers(questions, lm)
        for q in questions:  # one at a time: no padding, plain greedy, no stopping rule
            enc = tok(
                reward.answer_prompt(q), return_tensors="pt", add_special_tokens=style == "fewshot"
            )
            ids = lm.generate(
                **enc, max_new_tokens=n_new, do_sample=False, pad_token_id=tok.pad_token_id
            )
            raws.append(tok.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    widths = {len(tok(reward.answer_prompt(q))["input_ids"]) for q in questions}
    assert len(widths) > 1  # prompts of different lengths: the batch is padded
    assert any("\n" in r.lstrip() for r in raws), "the fixture must give a multi-line answer"
    assert batched == [first_line(r) for r in raws]
    assert all("\n" not in a for a in batched)
    assert sum(bool(a) for a in batched) >= 6
    assert tok.padding_side == "left"  # restored


def test_common_prefix_length_leaves_each_row_a_token() -> None:
    from contraq.reward.answers import common_prefix_length

    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # the last token stays each row's
    assert common_prefix_length([[7, 1], [8, 1]]) == 0
    assert common_prefix_length([[5]]) == 0
    assert common_prefix_length([]) == 0


@pytest.mark.parametrize("style", ["chat", "fewshot"])
def test_answer_prompt_prefix_runs_once(answering_lm, smol_tokenizer, nli, term, style) -> None:
    """The instruction shared by every answer prompt is one row of the first forward pass;
    the next pass holds the batch's own tokens only, and finished rows leave the batch (the
    answers themselves are checked against ``generate`` above)."""
    tok = smol_tokenizer
    questions = [q + "?" for q in QUESTIONS]
    reward = contradiction(answering_lm, tok, nli, term, answer_prompt={"style": style})
    shapes: list[tuple[int, int]] = []
    handle = answering_lm.get_input_embeddings().register_forward_hook(
        lambda _m, args, _out: shapes.append(tuple(args[0].shape))
    )
    try:
        with base_model(answering_lm) as lm:
            reward.generate_answers(questions, lm)
    finally:
        handle.remove()
    rows = reward._prompt_rows(questions)
    k = min(len(r) for r in rows)
    assert shapes[0][0] == 1 and shapes[0][1] > 10  # the common prefix, once
    assert shapes[1] == (len(questions), max(len(r) for r in rows) - shapes[0][1])
    assert shapes[1][1] < k  # far fewer tokens than the full prompts
    # Then one token per live row: rows that finished leave the batch.
    assert all(w == 1 for _, w in shapes[2:])
    assert shapes[-1][0] < len(questions) and shapes[2][0] == len(questions)


def test_right_padding_would_change_answers(answering_lm, smol_tokenizer, nli, term) -> None:
    """The comparison above can fail: with right padding the same batch answers differently."""
    tok = smol_tokenizer
    questions = [q + "?" for q in QUESTIONS]
    reward = contradiction(answering_lm, tok, nli, term)
    with base_model(answering_lm) as lm:
        left, _ = reward.generate_answers(questions, lm)
        reward.padding_side = "right"
        right, _ = reward.generate_answers(questions, lm)
    assert right != left


def test_min_len_penalty_counts_tokens_not_padding(answering_lm, smol_tokenizer, nli, term) -> None:
    tok = smol_tokenizer
    qs = question_ids(tok, ["Who is he", "Why", "Who is the CEO of Apple"], term)  # 3, 1, 6 tokens
    # Padding with the termination token: counting non-pad tokens would see 0 tokens.
    batch = make_batch(tok, PROMPTS[:3], qs, pad_id=term)
    reward = contradiction(answering_lm, tok, nli, term, min_len=3, min_log_r=-42.0)
    out = reward.terminal(facts_for(3), batch)
    assert out.components["length"].tolist() == [3.0, 1.0, 6.0]
    assert out.log_r[1].item() == -42.0
    for b in (0, 2):
        expected = out.components["log_c"][b] + 0.05 * out.components["log_pq"][b]
        assert out.log_r[b].item() == pytest.approx(expected.item())


def test_nan_in_a_component_is_caught_and_counted(answering_lm, smol_tokenizer, nli, term) -> None:
    tok = smol_tokenizer
    batch = make_batch(
        tok, PROMPTS[:4], question_ids(tok, QUESTIONS[:4], term), pad_id=tok.pad_token_id
    )
    with torch.no_grad():  # a broken judge: NaN logits for every pair
        nli.model.classifier.bias.fill_(float("nan"))
    assert torch.isnan(nli.log_contradiction(["a"], ["b"])).all()
    reward = contradiction(answering_lm, tok, nli, term, min_log_r=-50.0)
    out = reward.terminal(facts_for(4), batch)  # no exception
    assert out.log_r.tolist() == [-50.0] * 4
    assert out.components["n_nonfinite"].tolist() == [1.0] * 4
    assert torch.isfinite(out.components["log_c"]).all()  # stored as min_log_r
    prefix = reward.prefixes(facts_for(4)[:1], batch_rows(batch, 1), min_len=4)
    assert prefix[0, 4:6].tolist() == [-50.0, -50.0]


def test_hybrid_phase_switches_at_hybrid_steps(answering_lm, smol_tokenizer, nli, term) -> None:
    tok = smol_tokenizer
    batch = make_batch(tok, PROMPTS, question_ids(tok, QUESTIONS, term), pad_id=tok.pad_token_id)
    facts = facts_for(8)
    reward = contradiction(answering_lm, tok, nli, term, hybrid_steps=3, hybrid_penalty=7.0)
    after = reward.terminal(facts, batch, step=3)
    log_c, log_pq = after.components["log_c"], after.components["log_pq"]
    torch.testing.assert_close(after.log_r, log_c + 0.05 * log_pq)
    # A threshold between the judged probabilities: some rows are penalised, some not.
    threshold = float(log_c.exp().median())
    reward.cfg.hybrid_threshold = threshold
    warm = reward.terminal(facts, batch, step=2)
    below = (log_c < math.log(threshold)).float()
    assert 0 < below.sum() < 8
    torch.testing.assert_close(warm.log_r, log_pq - 7.0 * below)


def test_answer_likelihood_term(answering_lm, smol_tokenizer, nli, term) -> None:
    tok = smol_tokenizer
    batch = make_batch(
        tok, PROMPTS[:4], question_ids(tok, QUESTIONS[:4], term), pad_id=tok.pad_token_id
    )
    reward = contradiction(answering_lm, tok, nli, term, w_ans=0.2)
    out = reward.terminal(facts_for(4), batch)
    c = out.components
    torch.testing.assert_close(out.log_r, c["log_c"] + 0.05 * c["log_pq"] + 0.2 * c["log_pa"])
    with base_model(answering_lm) as lm:
        _, ids = reward.generate_answers(out.questions, lm)
        for b, q in enumerate(out.questions):
            assert tok.decode(ids[b]).strip() == out.answers[b]
            prompt = tok(reward.answer_prompt(q), add_special_tokens=False)["input_ids"]
            expected = brute_log_p(lm, prompt, ids[b]) if ids[b] else 0.0
            assert c["log_pa"][b].item() == pytest.approx(expected, abs=1e-4)


def test_counted_log_c_and_beta_by_hand() -> None:
    log_c = torch.tensor([-0.1, -9.0, -0.2, -0.3])
    form = torch.tensor([True, True, False, True])
    counted = counted_log_c(log_c, form, floor=-5.0)
    assert counted.tolist() == pytest.approx([-0.1, -5.0, -5.0, -0.3])
    log_pq = torch.tensor([-10.0, -20.0, -30.0, -40.0])
    log_r, _ = combine_log_reward(
        counted, log_pq, torch.full((4,), 9), w_lik=1.0, min_len=0, min_log_r=-500.0, beta=0.1
    )
    assert log_r.tolist() == pytest.approx([-11.0, -70.0, -80.0, -43.0])


def test_genuine_gate_gives_echoes_and_non_questions_the_floor(
    answering_lm, smol_tokenizer, nli, term
) -> None:
    tok = smol_tokenizer
    texts = ["What is the capital of France", "Paris is nice. He was who", "When did the war end"]
    batch = make_batch(tok, PROMPTS[:3], question_ids(tok, texts, term), pad_id=tok.pad_token_id)
    facts = [EditFact(subject="France", edit_fact="The capital of France is Lyon.")] * 3
    reward = contradiction(
        answering_lm,
        tok,
        nli,
        term,
        w_lik=0.5,
        beta=0.25,
        count_only_genuine=True,
        judge_question=True,
        log_c_floor=-4.0,
    )
    calls_before = nli.n_forward_calls
    out = reward.terminal(facts, batch)
    assert nli.n_forward_calls - calls_before == 2  # answers, then the questions themselves
    c = out.components
    assert c["is_question"].tolist() == [1.0, 0.0, 1.0]
    q_contra = nli.log_contradiction([f.edit_fact for f in facts], out.questions) > math.log(0.5)
    lexical = torch.tensor(echo_flags(out.questions, out.answers, [f.edit_fact for f in facts]))
    torch.testing.assert_close(c["is_echo"], (lexical | q_contra).float())
    form = c["is_question"].bool() & ~c["is_echo"].bool()
    counted = torch.where(form, c["log_c"].clamp(min=-4.0), torch.tensor(-4.0))
    torch.testing.assert_close(out.log_r, counted / 0.25 + 0.5 * c["log_pq"])
    assert out.log_r[1].item() == pytest.approx(-16.0 + 0.5 * c["log_pq"][1].item())
    genuine = form & (c["log_c"] > math.log(0.5))
    torch.testing.assert_close(c["genuine"], genuine.float())


def test_answer_gate_gives_answers_off_the_subject_the_floor(
    answering_lm, smol_tokenizer, nli, term
) -> None:
    """reward.answer_gate=subject: a row whose answer names no content word of its fact's
    subject gets log_c_floor; a row whose subject has no content word is not gated, and keeps
    the ungated log R; the eval's counted flag (genuine) does not change."""
    tok = smol_tokenizer
    texts = ["What is the capital of France", "When did the war end"] * 2
    batch = make_batch(tok, PROMPTS[:4], question_ids(tok, texts, term), pad_id=tok.pad_token_id)
    facts = [
        EditFact(subject="Zyxwvut", edit_fact="The capital of France is Lyon."),
        EditFact(subject="The", edit_fact="The war ended in 1990."),
    ] * 2
    kw = {"count_only_genuine": True, "judge_question": False, "log_c_floor": -4.0}
    free = contradiction(answering_lm, tok, nli, term, **kw).terminal(facts, batch)
    gated = contradiction(answering_lm, tok, nli, term, answer_gate="subject", **kw)
    out = gated.terminal(facts, batch)
    assert out.answers == free.answers
    assert not any("zyxwvut" in a.lower() for a in out.answers)
    assert out.components["answer_gated"].tolist() == [0.0, 1.0, 0.0, 1.0]
    c = out.components
    # beta 1, w_lik 0.05 (the helper's): the gated rows' log C is the floor
    torch.testing.assert_close(out.log_r[[0, 2]], -4.0 + 0.05 * c["log_pq"][[0, 2]])
    assert not torch.allclose(free.log_r[[0, 2]], out.log_r[[0, 2]])  # the gate did act
    torch.testing.assert_close(out.log_r[[1, 3]], free.log_r[[1, 3]])
    torch.testing.assert_close(c["genuine"], free.components["genuine"])
    with pytest.raises(ValueError, match="answer_gate"):
        ContradictionRewardConfig(answer_gate="object")


def test_contradiction_prefixes_equal_one_prefix_at_a_time(
    answering_lm, smol_tokenizer, nli, term
) -> None:
    tok = smol_tokenizer
    texts = ["Who is he", "Where was Marie Curie born", "Who leads Apple"]
    batch = make_batch(tok, PROMPTS[:3], question_ids(tok, texts, term), pad_id=term)
    facts = facts_for(3)
    reward = contradiction(answering_lm, tok, nli, term, min_len=2, batch_size=4)
    n_prefixes = sum(int(n) - 2 for n in batch.lengths)  # t = 2 .. k per row
    nli_before = nli.n_forward_calls
    with count_calls(reward, "greedy_continuations") as gen_calls:
        prefix = reward.prefixes(facts, batch, min_len=2)
    assert prefix.shape == batch.actions.shape
    assert len(gen_calls) == math.ceil(n_prefixes / 4)  # chunks of batch_size, all distinct here
    assert nli.n_forward_calls - nli_before == 1
    full = reward.terminal(facts, batch)
    for b in range(3):
        n = int(batch.lengths[b])
        for t in range(prefix.shape[1]):
            if 2 <= t < n:
                one = make_batch(
                    tok, [PROMPTS[b]], [batch.actions[b, :t].tolist() + [term]], pad_id=term
                )
                expected = reward.terminal([facts[b]], one).log_r.item()
                assert prefix[b, t].item() == pytest.approx(expected, abs=1e-4), (b, t)
            else:
                assert prefix[b, t].item() == 0.0
        assert prefix[b, n - 1].item() == pytest.approx(full.log_r[b].item(), abs=1e-4)


def test_repeated_rows_are_answered_and_scored_once(
    answering_lm, smol_tokenizer, nli, term, monkeypatch
) -> None:
    """A trained policy repeats its questions: each distinct (prompt, question) row is answered
    once and gets one log P_Q row, and every repeat gets the values it gets alone."""
    import contraq.reward.base as reward_base

    tok = smol_tokenizer
    picks = [(0, 0), (0, 0), (1, 1), (0, 0), (1, 1), (1, 2), (0, 2), (1, 1)]  # (prompt, question)
    questions = question_ids(tok, QUESTIONS[:3], term)
    batch = make_batch(
        tok, [PROMPTS[p] for p, _ in picks], [questions[q] for _, q in picks], pad_id=term
    )
    facts = [facts_for(2)[p] for p, _ in picks]
    n_distinct = len(set(picks))  # 4 rows: (0, 2) and (1, 2) differ in prompt only
    reward = contradiction(answering_lm, tok, nli, term, w_lik=0.1)
    scored: list[int] = []
    original = reward_base.base_logprobs

    def counting(model, prompt_ids, *args, **kwargs):
        scored.append(prompt_ids.shape[0])
        return original(model, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(reward_base, "base_logprobs", counting)
    answered: list[int] = []
    original_gc = reward.greedy_continuations
    monkeypatch.setattr(
        reward,
        "greedy_continuations",
        lambda rows, lm: answered.append(len(rows)) or original_gc(rows, lm),
    )
    out = reward.terminal(facts, batch)
    assert scored == [n_distinct]
    assert answered == [3]  # answers depend on the question text alone
    for b, (p, q) in enumerate(picks):
        one = make_batch(tok, [PROMPTS[p]], [questions[q]], pad_id=term)
        alone = reward.terminal([facts[b]], one)
        assert out.answers[b] == alone.answers[0]
        for key in ("log_pq", "log_c"):
            assert out.components[key][b].item() == pytest.approx(
                alone.components[key][0].item(), abs=1e-4
            ), (b, key)
        assert out.log_r[b].item() == pytest.approx(alone.log_r[0].item(), abs=1e-4)


# --------------------------------------------------------------------------- configs


def test_build_reward_from_configs(tiny_llama, smol_tokenizer, nli, term) -> None:
    cfg = compose_run(CONFIGS, ["sampler.min_len=3"]).reward
    reward = build_reward(cfg, tiny_llama, smol_tokenizer, term, nli=nli)
    assert isinstance(reward, ContradictionReward)
    assert reward.cfg.min_len == 3  # follows sampler.min_len
    assert reward.cfg.beta == 0.1 and reward.cfg.min_log_r == -150.0  # the YAML's choices
    assert reward.answer_style == "chat"  # auto: SmolLM2's tokenizer has a chat template
    lik = build_reward(
        compose_run(CONFIGS, ["reward=likelihood"]).reward, tiny_llama, smol_tokenizer, term
    )
    assert isinstance(lik, LikelihoodReward) and lik.min_len == 5
    with pytest.raises(ValueError, match="NLIScorer"):
        build_reward(cfg, tiny_llama, smol_tokenizer, term)
    with pytest.raises(ValueError, match="w_likk"):  # a plain mapping is checked too
        plain = OmegaConf.to_container(cfg, resolve=True)
        build_reward({**plain, "w_likk": 1.0}, tiny_llama, smol_tokenizer, term, nli=nli)
    with pytest.raises(ValueError, match="answer_prompt.style"):
        ContradictionRewardConfig.from_mapping({"answer_prompt": {"style": "poem"}})
    with pytest.raises(ValueError, match="fewshot_text"):
        ContradictionRewardConfig.from_mapping({"answer_prompt": {"fewshot_text": "Q: A:"}})
    with pytest.raises(ValueError, match="name='nope'"):
        build_reward({"name": "nope"}, tiny_llama, smol_tokenizer, term)


def test_rows_must_match_facts(tiny_llama, smol_tokenizer, term) -> None:
    tok = smol_tokenizer
    batch = make_batch(tok, PROMPTS[:2], question_ids(tok, QUESTIONS[:2], term), pad_id=term)
    with pytest.raises(ValueError, match="1 facts for 2 questions"):
        LikelihoodReward(tiny_llama, tok, term).terminal(facts_for(1), batch)


@pytest.mark.slow
def test_smollm2_answers_in_one_sentence(smollm2, smol_tokenizer, nli, term) -> None:
    """The default chat answer prompt on the real SmolLM2: declarative one-line answers, the
    same batched (left-padded) as one at a time."""
    tok = smol_tokenizer
    questions = ["What is the capital of France?", "What is the official language of Brazil?"]
    reward = contradiction(smollm2, tok, nli, term, answer_max_new_tokens=20)
    with base_model(smollm2) as lm:
        batched, _ = reward.generate_answers(questions, lm)
        single = [reward.generate_answers([q], lm)[0][0] for q in questions]
    assert batched == single
    assert "Paris" in batched[0] and "Portuguese" in batched[1], batched


@pytest.mark.slow
def test_smollm2_batched_answers_equal_generate(smollm2, smol_tokenizer, nli, term) -> None:
    """The shared-prefix greedy loop gives SmolLM2's own ``generate`` answers, one at a time."""
    tok = smol_tokenizer
    questions = [
        "Where was Anatole France born?",
        "What is the mother tongue of Danielle Darrieux?",
        "Who makes the iPhone?",
        "What language did Likkutei Sichos first appear in?",
    ]
    reward = contradiction(smollm2, tok, nli, term, answer_max_new_tokens=24)
    with base_model(smollm2) as lm:
        batched, _ = reward.generate_answers(questions, lm)
        single = []
        for q in questions:
            enc = tok(reward.answer_prompt(q), return_tensors="pt", add_special_tokens=False)
            out = lm.generate(
                **enc, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id
            )
            text = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            single.append(first_line(text))
    assert batched == single


# --------------------------------------------------------------------------- novelty term


def test_group_novelty_by_hand_and_its_group_mean_is_the_diversity() -> None:
    e = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [5.0, 5.0]])
    novelty = group_novelty(e, ["a", "a", "a", "b"])
    # cosines within "a": (0,1)=0, (0,2)=-1, (1,2)=0; row 3 is alone in "b".
    assert novelty.tolist() == pytest.approx([1.5, 1.0, 1.5, 0.0])
    assert novelty[:3].mean().item() == pytest.approx(pairwise_diversity(e[:3]))
    assert group_novelty(torch.ones(3, 2), [0, 0, 0]).tolist() == pytest.approx([0.0] * 3)
    with pytest.raises(ValueError, match="2 keys for 4"):
        group_novelty(e, ["a", "b"])


def test_novelty_term_by_hand() -> None:
    log_r, _ = combine_log_reward(
        torch.tensor([-0.1, -2.0]),
        torch.tensor([-10.0, -20.0]),
        torch.full((2,), 9),
        w_lik=1.0,
        min_len=0,
        min_log_r=-500.0,
        beta=0.1,
        novelty=torch.tensor([0.5, 0.0]),
        w_div=20.0,
    )
    assert log_r.tolist() == pytest.approx([-1.0 - 10.0 + 10.0, -20.0 - 20.0])
    cfg = ContradictionRewardConfig(w_div=20.0)
    ones = torch.ones(2)
    with pytest.raises(ValueError, match="needs each question's novelty"):
        counted_log_r(cfg, -ones, ones.bool(), -ones, ones)
    with pytest.raises(ValueError, match="w_div=-1.0"):
        ContradictionRewardConfig(w_div=-1.0)


def two_fact_rows(tok, term: int) -> tuple[SampleBatch, list[EditFact]]:
    """Eight rows: 0-3 of one fact (row 1 repeats row 0), 4-7 of another."""
    texts = [QUESTIONS[0], *QUESTIONS[:3], *QUESTIONS[4:]]
    batch = make_batch(tok, PROMPTS, question_ids(tok, texts, term), pad_id=tok.pad_token_id)
    two = facts_for(2)
    return batch, [two[0]] * 4 + [two[1]] * 4


def test_novelty_reward_adds_w_div_times_novelty_among_the_facts_rows(
    answering_lm, smol_tokenizer, nli, term, embedder
) -> None:
    """Rows 0-3 belong to one fact, 4-7 to another (row 1 repeats row 0): each question's
    novelty is counted among its own fact's rows only, and adds w_div x novelty to log R; a
    rescore of the records (novelty dropped) computes the same values again."""
    from contraq.evaluation.reuse import with_log_r

    tok = smol_tokenizer
    batch, facts = two_fact_rows(tok, term)
    two = [facts[0], facts[4]]
    plain = contradiction(answering_lm, tok, nli, term).terminal(facts, batch)
    reward = contradiction(answering_lm, tok, nli, term, embedder, w_div=20.0)
    out = reward.terminal(facts, batch)
    first = group_novelty(embedder.encode(out.questions[:4]), ["a"] * 4)
    second = group_novelty(embedder.encode(out.questions[4:]), ["b"] * 4)
    expected = torch.cat([first, second])
    torch.testing.assert_close(out.components["novelty"], expected, atol=1e-5, rtol=0)
    assert out.components["novelty"][0] < out.components["novelty"][2]  # row 0 has a twin
    torch.testing.assert_close(out.log_r, plain.log_r + 20.0 * expected, atol=1e-4, rtol=0)
    assert "novelty" not in plain.components
    records = [
        {"method": "m", "fact_index": 0 if b < 4 else 1, "question": out.questions[b]}
        | {k: v for k, v in out.row_components(b).items() if k != "novelty"}
        for b in range(8)
    ]
    again = with_log_r(records, reward.cfg, step=0)
    got = torch.tensor([r["log_r"] for r in again])
    torch.testing.assert_close(got, out.log_r, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="needs a sentence embedder"):
        contradiction(answering_lm, tok, nli, term, w_div=1.0)

    # div_gate=subject: only rows that name their fact's subject earn the term (rows 0, 1
    # name "Marie Curie", row 4 "Messi"); the stored novelty stays ungated, and a rescore
    # of the records applies the gate again from each record's question and subject.
    named = [replace(two[0], subject="Marie Curie")] * 4 + [replace(two[1], subject="Messi")] * 4
    gated = contradiction(answering_lm, tok, nli, term, embedder, w_div=20.0, div_gate="subject")
    out_gated = gated.terminal(named, batch)
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(out_gated.components["novelty"], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        out_gated.log_r, plain.log_r + 20.0 * expected * mask, atol=1e-4, rtol=0
    )
    records = [
        r | {"subject": named[b].subject} | {"novelty": float(expected[b])}
        for b, r in enumerate(records)
    ]
    again = with_log_r(records, gated.cfg, step=0)
    got = torch.tensor([r["log_r"] for r in again])
    torch.testing.assert_close(got, out_gated.log_r, atol=1e-4, rtol=0)


def test_sharing_reward_divides_by_the_counted_rows_of_one_meaning(
    answering_lm, smol_tokenizer, tiny_nli_dir, tmp_path, term, embedder
) -> None:
    """With w_share each counted row loses w_share x log(its crowding) among its own fact's
    counted rows (row 1 repeats row 0), others keep their log R; a rescore of the records
    (crowding dropped) computes the same values again. The tiny judge's contradiction bias is
    raised so that most rows are counted."""
    from transformers import AutoModelForSequenceClassification

    from contraq.evaluation.reuse import with_log_r
    from contraq.lm.embedding import cluster_crowding

    judge = AutoModelForSequenceClassification.from_pretrained(tiny_nli_dir)
    with torch.no_grad():
        judge.classifier.bias[1] += 8.0  # index 1: contradiction in the tiny judge
    judge.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_nli_dir).save_pretrained(tmp_path)
    nli = NLIScorer(tmp_path, device="cpu", batch_size=64)
    tok = smol_tokenizer
    batch, facts = two_fact_rows(tok, term)
    plain = contradiction(answering_lm, tok, nli, term).terminal(facts, batch)
    reward = contradiction(answering_lm, tok, nli, term, embedder, w_share=2.0)
    out = reward.terminal(facts, batch)
    counted = out.components["genuine"].bool()
    keys = [f.edit_fact for f in facts]
    expected = cluster_crowding(embedder.encode(out.questions), keys, counted.cpu())
    crowding = out.components["crowding"]
    torch.testing.assert_close(crowding, expected)
    assert bool((crowding[~counted] == 1).all())
    torch.testing.assert_close(out.log_r, plain.log_r - 2.0 * crowding.log(), atol=1e-4, rtol=0)
    records = [
        {"method": "m", "fact_index": 0 if b < 4 else 1, "question": out.questions[b]}
        | {k: v for k, v in out.row_components(b).items() if k != "crowding"}
        for b in range(8)
    ]
    again = with_log_r(records, reward.cfg, step=0)
    torch.testing.assert_close(
        torch.tensor([r["log_r"] for r in again]), out.log_r, atol=1e-4, rtol=0
    )
    with pytest.raises(ValueError, match="needs a sentence embedder"):
        contradiction(answering_lm, tok, nli, term, w_share=1.0)
    assert int(counted.sum()) >= 4 and float(crowding.max()) >= 2  # the test has teeth


def test_novelty_credit_gates_by_subject() -> None:
    novelty = torch.tensor([0.5, 0.25, 0.75])
    questions = ["Where was Marie Curie born?", "Who was born in Warsaw?", "Was curie a chemist?"]
    subjects = ["Marie Curie", "Marie Curie", "Curie"]
    assert novelty_credit(novelty, questions, subjects, "none").tolist() == [0.5, 0.25, 0.75]
    assert novelty_credit(novelty, questions, subjects, "subject").tolist() == [0.5, 0.0, 0.75]
    with pytest.raises(ValueError, match="div_gate='facts'"):
        novelty_credit(novelty, questions, subjects, "facts")
    with pytest.raises(ValueError, match="div_gate=.facts.: expected none or subject"):
        ContradictionRewardConfig(div_gate="facts")


@pytest.mark.parametrize("genuine_gate", [False, True])
def test_rescoring_with_the_same_judge_reproduces_the_reward(
    answering_lm, smol_tokenizer, nli, term, genuine_gate
) -> None:
    """`contraq rescore` recomputes log C, echo, counted and log R from the stored answers: with
    the judge that scored them it must give the reward's own numbers back."""
    from contraq.evaluation.rescore import rescore_records

    tok = smol_tokenizer
    batch = make_batch(tok, PROMPTS, question_ids(tok, QUESTIONS, term), pad_id=tok.pad_token_id)
    facts = facts_for(8)
    gate = {"count_only_genuine": genuine_gate, "judge_question": genuine_gate}
    reward = contradiction(answering_lm, tok, nli, term, beta=0.5, log_c_floor=-5.0, **gate)
    out = reward.terminal(facts, batch)
    records = [
        {
            "edit_fact": f.edit_fact,
            "question": out.questions[b],
            "answer": out.answers[b],
            "log_r": 123.0,  # stale values that rescoring must replace
            "genuine": 7.0,
            **{k: v for k, v in out.row_components(b).items() if k not in ("genuine", "log_c")},
        }
        for b, f in enumerate(facts)
    ]
    again = rescore_records(records, nli, reward.cfg, step=0)
    torch.testing.assert_close(torch.tensor([r["log_r"] for r in again]), out.log_r.float())
    for key in ("log_c", "is_question", "is_echo", "genuine"):
        got = torch.tensor([r[key] for r in again])
        torch.testing.assert_close(got, out.components[key].float(), msg=key)
    assert again[0]["question"] == records[0]["question"]


@pytest.mark.parametrize("every", [1, 4])
def test_answer_loop_syncs_the_host_once_per_look(
    answering_lm, smol_tokenizer, nli, term, monkeypatch, every
) -> None:
    """Outside the model's forward pass, the greedy answer loop waits for the device once per
    look at its rows: every token on the CPU (it used to wait four times: the tokens, their
    decoding, the all-done test and the count of live rows), every GPU_CHECK_EVERY tokens on a
    GPU (run here on the CPU with checking_every), where it also reads the answers' width once
    at the end. The stop rules run on the device; the answers are the same either way."""
    import contraq.reward.answers as answers_module
    from contraq.syncs import checking_every, count_host_syncs, not_counted

    original = answers_module.forward

    def uncounted(*args, **kwargs):
        with not_counted():
            return original(*args, **kwargs)

    monkeypatch.setattr(answers_module, "forward", uncounted)
    tok = smol_tokenizer
    reward = contradiction(answering_lm, tok, nli, term, answer_max_new_tokens=12)
    rows = reward._prompt_rows([q + "?" for q in QUESTIONS])
    with base_model(answering_lm) as lm:
        expected = reward.greedy_continuations(rows, lm)
        with checking_every(every), count_host_syncs() as counts:
            new = reward.greedy_continuations(rows, lm)
    assert new == expected
    n_tokens = len(new[0])
    assert n_tokens > 3
    syncs = sum(counts.values())
    if every == 1:
        assert syncs == n_tokens, dict(counts)
    else:
        assert syncs <= n_tokens // every + 1, dict(counts)
