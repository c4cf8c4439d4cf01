"""Rows that share a prompt share its forward pass, and nothing they compute changes."""

from __future__ import annotations

import pytest
import torch

from contraq.lm.forward import (
    decode_mask,
    decode_step,
    distinct_prompts,
    forward,
    positions,
    prefill,
)
from contraq.lm.models import ModelConfig, attach_lora, build_tiny_model
from contraq.lm.packing import no_packing
from contraq.lm.sampling import SamplerConfig, default_banned_token_ids, sample, score_actions

PROMPTS = [
    "Ask a question about Paris:\nQuestion:",
    "Hi",
    "Ask a question about the Eiffel Tower, a wrought-iron lattice tower:\nQuestion:",
]
ORDER = [0, 0, 1, 2, 0, 2, 1, 1]  # 8 rows, 3 distinct prompts of 3 lengths, out of order
ATOL = 1e-4


def batch_prompts(tokenizer):
    enc = tokenizer([PROMPTS[i] for i in ORDER], return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


def sampler_cfg(tokenizer) -> SamplerConfig:
    term = tokenizer.convert_tokens_to_ids("?")
    return SamplerConfig(
        termination_token_id=term,
        pad_token_id=tokenizer.pad_token_id,
        min_len=2,
        max_len=7,
        banned_token_ids=default_banned_token_ids(tokenizer, term),
    )


def count_rows_in_first_pass(model, fn):
    """Calls ``fn()`` and returns the batch size of the first forward pass through the
    embedding layer, and ``fn``'s result."""
    seen: list[int] = []
    handle = model.get_input_embeddings().register_forward_hook(
        lambda _m, args, _out: seen.append(args[0].shape[0])
    )
    try:
        out = fn()
    finally:
        handle.remove()
    return seen[0], out


def test_distinct_prompts_inverse_rebuilds_the_batch(smol_tokenizer):
    ids, mask = batch_prompts(smol_tokenizer)
    uids, umask, inverse = distinct_prompts(ids, mask)
    assert uids.shape[0] == 3
    assert torch.equal(uids[inverse], ids) and torch.equal(umask[inverse], mask)


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_shared_prompt_pass_equals_one_row_at_a_time(arch, request, smol_tokenizer):
    """Log-probs, prompt hidden states and LoRA gradients of the shared pass equal those of
    each row scored alone (a batch of one row has nothing to share: the full pass). The padded
    passes (no packing: tests/test_packing.py checks the packed one against them)."""
    with no_packing():
        _shared_equals_one_row(request.getfixturevalue(arch), smol_tokenizer)


def _shared_equals_one_row(model, smol_tokenizer):
    cfg = sampler_cfg(smol_tokenizer)
    ids, mask = batch_prompts(smol_tokenizer)
    rows, batch = count_rows_in_first_pass(
        model, lambda: sample(model, ids, mask, cfg, torch.Generator().manual_seed(0))
    )
    assert rows == 3  # the sampler ran each distinct prompt once
    torch.testing.assert_close(
        score_actions(model, ids, mask, batch.actions, cfg)[0], batch.log_pf, atol=ATOL, rtol=0
    )
    # Rows of several lengths (a random model never draws the termination token itself).
    actions = batch.actions.clone()
    for b, end in [(1, 3), (3, 4), (6, 5)]:
        actions[b, end] = cfg.termination_token_id
        actions[b, end + 1 :] = cfg.pad_token_id

    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    model.zero_grad()
    rows, (log_pf, log_pterm, hidden) = count_rows_in_first_pass(
        model,
        lambda: score_actions(model, ids, mask, actions, cfg, return_prompt_hidden=True),
    )
    assert rows == 3
    (log_pf.sum() + 0.1 * hidden.sum()).backward()
    shared_grads = [p.grad.clone() for p in lora]
    assert bool((log_pf[1, 4:] == 0).all()) and bool((log_pf[1, :4] != 0).all())

    model.zero_grad()
    total = 0.0
    for b in range(len(ORDER)):
        pf_b, pt_b, h_b = score_actions(
            model, ids[b : b + 1], mask[b : b + 1], actions[b : b + 1], cfg, True
        )
        torch.testing.assert_close(pf_b, log_pf[b : b + 1], atol=ATOL, rtol=0)
        torch.testing.assert_close(pt_b, log_pterm[b : b + 1], atol=ATOL, rtol=0)
        real = mask[b].bool()  # padded positions' hidden states are never pooled
        torch.testing.assert_close(h_b[0][real], hidden[b][real], atol=ATOL, rtol=1e-4)
        total = total + pf_b.sum() + 0.1 * h_b.sum()
    total.backward()
    for got, want in zip(shared_grads, (p.grad for p in lora), strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    model.zero_grad()


def test_no_sharing_under_gradient_checkpointing_while_training(smol_tokenizer):
    """transformers drops the KV cache in a checkpointed layer that trains: prefill steps
    aside there (and in eval mode, or without gradients, it shares again)."""
    mcfg = ModelConfig(source="tiny", tiny_arch="llama", gradient_checkpointing=True)
    policy = attach_lora(build_tiny_model("llama", smol_tokenizer, seed=0), mcfg)
    ids, mask = batch_prompts(smol_tokenizer)
    policy.train()
    assert prefill(policy, ids, mask) is None
    cfg = sampler_cfg(smol_tokenizer)
    actions = torch.randint(100, 1000, (len(ORDER), 4), generator=torch.Generator().manual_seed(0))
    actions[:, 3] = cfg.termination_token_id
    with no_packing():
        full, _ = score_actions(policy, ids, mask, actions, cfg)  # the full pass
    assert full.requires_grad
    with torch.no_grad():
        assert prefill(policy, ids, mask) is not None
    policy.eval()
    assert prefill(policy, ids, mask) is not None
    with no_packing():
        shared, _ = score_actions(policy, ids, mask, actions, cfg)
    torch.testing.assert_close(shared, full, atol=ATOL, rtol=0)


def test_distinct_rows_are_not_prefilled(tiny_llama, smol_tokenizer):
    enc = smol_tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert prefill(tiny_llama, enc.input_ids, enc.attention_mask) is None


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_decode_steps_prepared_mask_gives_the_2d_masks_logits(arch, request, smol_tokenizer):
    """A decoding step hands transformers its mask in the prepared 4-D form (no host check of
    the padding per token): on left-padded rows the logits and the cache's next step are those
    of the 2-D mask, in sdpa and in eager attention; a padded key changes them."""
    model = request.getfixturevalue(arch)
    hf = model.get_base_model()
    enc = smol_tokenizer(
        ["Ask about Apple and its founders.", "Hi"], return_tensors="pt", padding=True
    )
    ids, mask = enc.input_ids, enc.attention_mask
    assert not bool(mask.all())  # left padding in row 1
    token = torch.tensor([11, 12])
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
    pos = mask.sum(1, keepdim=True)
    saved = hf.config._attn_implementation
    try:
        for impl in ("sdpa", "eager"):
            hf.config._attn_implementation = impl
            with torch.no_grad():
                _, cache, _ = forward(model, ids, mask, positions(mask), keep=1, use_cache=True)
                mine, _ = decode_step(model, token, step_mask, pos, cache)
                _, cache, _ = forward(model, ids, mask, positions(mask), keep=1, use_cache=True)
                plain, _, _ = forward(
                    model, token[:, None], step_mask, pos, keep=1, cache=cache, use_cache=True
                )
                assert decode_mask(model, step_mask).shape == (2, 1, 1, step_mask.shape[1])
                torch.testing.assert_close(mine, plain, atol=1e-5, rtol=0)
                _, cache, _ = forward(model, ids, mask, positions(mask), keep=1, use_cache=True)
                blind = step_mask.clone()
                blind[0, -3] = 0  # hide one key of row 0
                other, _ = decode_step(model, token, blind, pos, cache)
                assert not torch.allclose(other[0], mine[0], atol=1e-4)
    finally:
        hf.config._attn_implementation = saved
