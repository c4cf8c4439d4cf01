"""The sampler's float16 copy of the policy (contraq.lm.float16_copy), on conftest's tiny random
Llama (LoRA B non-zero, so the adapters change the logits)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.ao.nn.quantized import dynamic as qdyn

from contraq.lm.float16_copy import float16_policy_copy, resolve_sample_weights
from contraq.lm.models import base_model, termination_token_id
from contraq.lm.sampling import SamplerConfig, sample
from contraq.lm.tokens import left_pad

PROMPTS = ["Ask one short question about Marie Curie.", "Ask about Apple."]


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
