"""The frozen base's copy with fewer bytes per weight (contraq.reward.frozen_weights) and the
sampler's float16 copy of the policy (contraq.lm.float16_copy), on the tiny random Llama of
conftest (its LoRA B matrices are non-zero, so policy != base)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.ao.nn.quantized import dynamic as qdyn

from contraq.judge.scorer import NLIScorer
from contraq.lm.float16_copy import float16_policy_copy, resolve_sample_weights
from contraq.lm.models import base_model, termination_token_id
from contraq.lm.sampling import SamplerConfig, sample, token_logprobs
from contraq.lm.tokens import left_pad
from contraq.reward.contradiction import ContradictionReward, ContradictionRewardConfig
from contraq.reward.frozen_weights import (
    INT8_FLOAT_LAST_LAYERS,
    frozen_copy,
    int8_linear_names,
    resolve_frozen_weights,
)

PROMPTS = ["Ask one short question about Marie Curie.", "Ask about Apple."]
QUESTIONS = ["Where was Marie Curie born?", "Who is the CEO of Apple?"]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def logits(model: nn.Module, tok, texts: list[str]) -> torch.Tensor:
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits.float()


def test_auto_is_float16_for_float32_on_the_cpu_only(tiny_llama) -> None:
    assert resolve_frozen_weights("auto", tiny_llama) == "float16"
    assert resolve_frozen_weights("shared", tiny_llama) == "shared"
    assert resolve_frozen_weights("int8", tiny_llama) == "int8"
    half = nn.Linear(2, 2).to(torch.bfloat16)  # weights in 2 bytes already
    assert resolve_frozen_weights("auto", half) == "shared"
    with pytest.raises(ValueError, match="frozen_weights='fp8'"):
        resolve_frozen_weights("fp8", tiny_llama)
    with pytest.raises(ValueError, match="reward config field frozen_weights='fp8'"):
        ContradictionRewardConfig(frozen_weights="fp8")


def test_float16_copy_is_the_base_without_lora(tiny_llama, smol_tokenizer) -> None:
    """Every Linear of the copy holds float16 weights; its logits are the base's (adapters
    off) up to float16 rounding, far from the adapted policy's; the embeddings are shared."""
    tok = smol_tokenizer
    copy16 = frozen_copy(tiny_llama, "float16")
    linears = [m for m in copy16.modules() if isinstance(m, qdyn.Linear)]
    assert linears and not any(type(m) is nn.Linear for m in copy16.modules())
    assert all(m._packed_params.dtype == torch.float16 for m in linears)
    got = logits(copy16, tok, PROMPTS)
    with base_model(tiny_llama) as lm:
        base = logits(lm, tok, PROMPTS)
    adapted = logits(tiny_llama, tok, PROMPTS)
    torch.testing.assert_close(got, base, atol=2e-3, rtol=0)
    assert (adapted - base).abs().max() > 100 * (got - base).abs().max()
    own = tiny_llama.get_base_model().get_input_embeddings()
    assert copy16.get_input_embeddings() is own
    assert all(p.requires_grad is False for p in copy16.parameters())


def test_int8_copy_keeps_the_head_and_last_layers_float(tiny_llama, smol_tokenizer) -> None:
    copy8 = frozen_copy(tiny_llama, "int8")
    n_layers = copy8.config.num_hidden_layers
    names = int8_linear_names(copy8, INT8_FLOAT_LAST_LAYERS)
    for name, module in copy8.named_modules():
        if name in names:
            assert isinstance(module, qdyn.Linear), name
    layers = {int(n.split(".")[2]) for n in names}
    assert layers == set(range(n_layers - INT8_FLOAT_LAST_LAYERS))
    assert int8_linear_names(copy8, 0) and all("lm_head" not in n for n in names)
    # The tied float head reads the policy's own embedding matrix: no second copy of it.
    own = tiny_llama.get_base_model().get_input_embeddings().weight
    assert copy8.get_output_embeddings().weight is own
    assert logits(copy8, smol_tokenizer, PROMPTS).isfinite().all()


def test_reward_answers_and_log_pq_on_the_float16_copy(
    tiny_llama, smol_tokenizer, tiny_nli_dir: Path
) -> None:
    """``frozen_weights=float16`` answers like ``shared`` and gives log P_Q within float16
    rounding, from one copy made once."""
    tok = smol_tokenizer
    term = termination_token_id(tok, "?")
    nli = NLIScorer(tiny_nli_dir, device="cpu", batch_size=64)
    cfg = {"answer_max_new_tokens": 8, "answer_prompt": {"style": "chat"}}
    rewards = {
        kind: ContradictionReward(tiny_llama, tok, nli, {**cfg, "frozen_weights": kind}, term)
        for kind in ("shared", "float16")
    }
    outs = {}
    for kind, reward in rewards.items():
        with base_model(tiny_llama) as lm:
            run_on = reward.frozen_lm(lm)
            answers, _ = reward.generate_answers(QUESTIONS, run_on)
            enc = tok(PROMPTS, return_tensors="pt", padding=True)
            acts = tok(QUESTIONS, return_tensors="pt", padding=True)["input_ids"]
            lp = token_logprobs(
                run_on, enc["input_ids"], enc["attention_mask"], acts, termination_token_id=term
            )
        outs[kind] = (answers, lp)
        assert (run_on is lm) == (kind == "shared")
        with base_model(tiny_llama) as lm:
            assert reward.frozen_lm(lm) is run_on  # made once
    assert outs["float16"][0] == outs["shared"][0]
    torch.testing.assert_close(outs["float16"][1], outs["shared"][1], atol=5e-3, rtol=0)


def test_quantised_copy_refuses_a_model_off_the_cpu() -> None:
    """Off the CPU the error names the key (a model on the meta device stands in for a GPU
    here: any device but the CPU takes the same branch), and ``auto`` shares the weights."""
    off_cpu = nn.Linear(2, 2, device="meta")
    with pytest.raises(ValueError, match=r"reward.frozen_weights=float16: .* on meta"):
        frozen_copy(off_cpu, "float16")
    assert resolve_frozen_weights("auto", off_cpu) == "shared"


# The sampler's float16 copy of the policy (contraq.lm.float16_copy): LoRA shared, not dropped.


def test_sampler_copy_is_auto_for_float32_on_the_cpu_only(tiny_llama) -> None:
    assert resolve_sample_weights("auto", tiny_llama) == "float16"
    assert resolve_sample_weights("shared", tiny_llama) == "shared"
    assert resolve_sample_weights("auto", nn.Linear(2, 2).to(torch.bfloat16)) == "shared"
    with pytest.raises(ValueError, match="train.sample_weights='int8'"):
        resolve_sample_weights("int8", tiny_llama)
    with pytest.raises(ValueError, match="float32 model on the CPU, not torch.bfloat16"):
        float16_policy_copy(nn.Linear(2, 2).to(torch.bfloat16))


def test_copy_is_the_policy_in_float16_sharing_its_lora(tiny_llama, smol_tokenizer) -> None:
    """The copy's frozen Linears are float16, its LoRA parameters are the policy's own
    tensors, its logits are the adapted policy's up to float16 rounding (far from the base's),
    and nothing of it joins the policy's parameters or gradients."""
    tok, policy = smol_tokenizer, tiny_llama
    keys = set(policy.state_dict())
    clone = float16_policy_copy(policy)
    assert set(policy.state_dict()) == keys
    assert any(isinstance(m, qdyn.Linear) for m in clone.modules())
    assert not any(type(m) is nn.Linear and "lora" not in n for n, m in clone.named_modules())
    lora = {id(p) for n, p in policy.named_parameters() if "lora_" in n}
    clone_lora = {id(p) for n, p in clone.named_parameters() if "lora_" in n}
    assert lora and clone_lora == lora
    assert all(not p.requires_grad for n, p in clone.named_parameters() if "lora_" not in n)
    mine, theirs = logits(clone, tok, PROMPTS), logits(policy, tok, PROMPTS)
    with base_model(policy) as base:
        plain = logits(base, tok, PROMPTS)
    gap = (mine - theirs).abs().max()
    assert gap < 0.05 * (theirs - plain).abs().max()


def test_a_lora_update_reaches_the_copy(tiny_llama, smol_tokenizer) -> None:
    """An optimizer-like in-place update of the policy's LoRA B moves the copy's logits as
    much as the policy's (no sync step), and restoring it restores them."""
    tok, policy = smol_tokenizer, tiny_llama
    clone = float16_policy_copy(policy)
    before = logits(clone, tok, PROMPTS)
    b = next(p for n, p in policy.named_parameters() if "lora_B" in n)
    saved = b.detach().clone()
    try:
        with torch.no_grad():
            b.add_(0.5)
        moved, reference = logits(clone, tok, PROMPTS), logits(policy, tok, PROMPTS)
        assert (moved - before).abs().max() > 0.1
        assert (moved - reference).abs().max() < 0.05 * (moved - before).abs().max()
    finally:
        with torch.no_grad():
            b.copy_(saved)
    assert torch.allclose(logits(clone, tok, PROMPTS), before)


def test_the_copy_samples_the_policys_questions(tiny_llama, smol_tokenizer) -> None:
    """Same generator, same prompts: the copy draws the policy's tokens (float16 rounding
    moves no draw here), with log P_F within rounding of the policy's."""
    tok, policy = smol_tokenizer, tiny_llama
    term = termination_token_id(tok)
    cfg = SamplerConfig(termination_token_id=term, pad_token_id=tok.pad_token_id, max_len=8)
    rows = [tok.encode(p) for p in PROMPTS for _ in range(4)]
    ids, mask = left_pad(rows, tok.pad_token_id, torch.device("cpu"))
    clone = float16_policy_copy(policy)
    a = sample(policy, ids, mask, cfg, generator=torch.Generator().manual_seed(3))
    b = sample(clone, ids, mask, cfg, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.actions, b.actions)
    assert torch.allclose(a.log_pf, b.log_pf, atol=1e-2)
