"""The sampler and its teacher-forced re-evaluation agree, and respect the conventions."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from contraq.lm.sampling import (
    SampleBatch,
    SamplerConfig,
    default_banned_token_ids,
    device_generator,
    draw_tokens,
    sample,
    score_actions,
    token_logprobs,
)
from contraq.syncs import checking_every

PROMPTS = [
    "Generate a question about Paris:\nQuestion:",
    "Hi",
    "Generate a question about the Eiffel Tower, a wrought-iron lattice tower:\nQuestion:",
    "Tell me",
]
ATOL = 1e-4


def encode(tokenizer, prompts=PROMPTS):
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    assert tokenizer.padding_side == "left"
    return enc.input_ids, enc.attention_mask


def naive_scores(model, prompt_ids, prompt_mask, actions, cfg: SamplerConfig):
    """KV-cache-free reference: re-run the whole prefix at every step, masks applied by hand
    (independently of sampler.step_bias). Returns log_pf, log_pterm, raw log-probs [B, T]."""
    batch, n_steps = actions.shape
    log_pf = torch.zeros(batch, n_steps)
    log_pterm = torch.zeros(batch, n_steps)
    raw = torch.zeros(batch, n_steps)
    term = cfg.termination_token_id
    banned = torch.tensor(cfg.banned_token_ids, dtype=torch.long)
    with torch.no_grad():
        for b in range(batch):
            real = prompt_ids[b][prompt_mask[b].bool()]  # unpadded prompt
            for t in range(n_steps):
                ids = torch.cat([real, actions[b, :t]])[None]
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
                logits = logits.float().clone()
                raw[b, t] = torch.log_softmax(logits, -1)[actions[b, t]]
                logits[banned] = logits[banned] - cfg.ban_penalty
                if t >= cfg.max_len - 1:
                    keep = logits[term].clone()
                    logits[:] = -math.inf
                    logits[term] = keep
                elif t < cfg.min_len:
                    logits[term] = -math.inf
                logp = torch.log_softmax(logits, -1)
                log_pf[b, t] = logp[actions[b, t]]
                if t >= cfg.min_len or t >= cfg.max_len - 1:
                    log_pterm[b, t] = logp[term]
                if actions[b, t] == term:
                    break
    return log_pf, log_pterm, raw


def config_with_early_stop(model, tokenizer, seed=0, **overrides) -> SamplerConfig:
    """A SamplerConfig whose termination token this random model actually emits early.

    A random tiny model never picks `?` by chance (p ~ 1/49152), so the termination token is
    taken from a first run: the token row 0 drew at step min_len + 1. Rerun with the same
    seed, row 0 follows the same path and stops there; other rows run to max_len.
    """
    prompt_ids, prompt_mask = encode(tokenizer)
    base = dict(
        termination_token_id=0,  # <|endoftext|>: banned below, so never drawn in the first run
        pad_token_id=tokenizer.pad_token_id,
        min_len=3,
        max_len=10,
        temperature=0.7,
        top_k=200,
        banned_token_ids=default_banned_token_ids(tokenizer, 0) + list(range(100, 20000)),
    )
    base.update(overrides)
    probe = sample(model, prompt_ids, prompt_mask, SamplerConfig(**base), seeded(seed))
    k = base["min_len"] + 1
    term = int(probe.actions[0, k])
    assert term not in probe.actions[0, :k].tolist()
    banned = [t for t in base["banned_token_ids"] if t != term]
    return SamplerConfig(**{**base, "termination_token_id": term, "banned_token_ids": banned})


def assert_scores_match(model, prompt_ids, prompt_mask, batch: SampleBatch, cfg: SamplerConfig):
    """The one teacher-forced pass and the naive loop both give the sampler's log-probs;
    returns (log_pf of the pass, the naive raw token log-probs)."""
    log_pf, log_pterm = score_actions(model, prompt_ids, prompt_mask, batch.actions, cfg)
    torch.testing.assert_close(log_pf, batch.log_pf, atol=ATOL, rtol=0)
    torch.testing.assert_close(log_pterm, batch.log_pterm, atol=ATOL, rtol=0)
    ref_pf, ref_pterm, ref_raw = naive_scores(model, prompt_ids, prompt_mask, batch.actions, cfg)
    torch.testing.assert_close(batch.log_pf, ref_pf, atol=ATOL, rtol=0)
    torch.testing.assert_close(batch.log_pterm, ref_pterm, atol=ATOL, rtol=0)
    return log_pf, ref_raw


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check_invariants(batch: SampleBatch, cfg: SamplerConfig) -> None:
    term, n_steps = cfg.termination_token_id, batch.actions.shape[1]
    lengths = batch.lengths
    assert n_steps == int(lengths.max()) <= cfg.max_len
    assert bool((lengths >= min(cfg.min_len + 1, cfg.max_len)).all()), "min_len violated"
    rows = torch.arange(len(batch))
    assert bool((batch.actions[rows, lengths - 1] == term).all()), "row does not end with term"
    mask = batch.action_mask
    before_end = mask & (torch.arange(n_steps)[None] < (lengths - 1)[:, None])
    assert not bool((batch.actions[before_end] == term).any()), "term before the end"
    assert bool((batch.actions[~mask] == cfg.pad_token_id).all())
    assert bool((batch.log_pf[~mask] == 0).all()) and bool((batch.log_pterm[~mask] == 0).all())
    assert bool((batch.log_pterm[:, : cfg.min_len] == 0).all())
    assert bool((batch.log_pf[mask] <= 0).all())
    assert bool(torch.isfinite(batch.log_pf).all()) and bool(torch.isfinite(batch.log_pterm).all())
    # At the termination step, the action's log-prob is the termination log-prob.
    assert torch.equal(batch.log_pf[rows, lengths - 1], batch.log_pterm[rows, lengths - 1])


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_teacher_forced_matches_sampler_and_naive_loop(arch, request, smol_tokenizer):
    model = request.getfixturevalue(arch)
    cfg = config_with_early_stop(model, smol_tokenizer)
    prompt_ids, prompt_mask = encode(smol_tokenizer)
    batch = sample(model, prompt_ids, prompt_mask, cfg, seeded(0))
    check_invariants(batch, cfg)
    # The batch exercises early termination and max_len forcing, with left padding.
    assert int(batch.lengths.min()) < cfg.max_len == int(batch.lengths.max())
    assert bool((prompt_mask == 0).any())

    log_pf, ref_raw = assert_scores_match(model, prompt_ids, prompt_mask, batch, cfg)

    raw = token_logprobs(model, prompt_ids, prompt_mask, batch.actions, lengths=batch.lengths)
    torch.testing.assert_close(raw, ref_raw, atol=ATOL, rtol=0)
    raw_by_term = token_logprobs(
        model, prompt_ids, prompt_mask, batch.actions, termination_token_id=cfg.termination_token_id
    )
    torch.testing.assert_close(raw_by_term, raw, atol=0, rtol=0)
    # Off-policy: the untempered log-probs are not the tempered ones the sampler drew from,
    # and the raw log-probs differ from the masked policy where termination was masked.
    assert not torch.allclose(raw[:, : cfg.min_len], log_pf[:, : cfg.min_len], atol=1e-6)


@pytest.mark.slow
def test_teacher_forced_matches_sampler_smollm2(smollm2, smol_tokenizer):
    from contraq.lm.models import termination_token_id

    term = termination_token_id(smol_tokenizer, "?")
    cfg = SamplerConfig(
        termination_token_id=term,
        pad_token_id=smol_tokenizer.pad_token_id,
        min_len=2,
        max_len=8,
        temperature=1.3,
        top_k=40,
        banned_token_ids=default_banned_token_ids(smol_tokenizer, term),
    )
    # Three prompts and 8 steps keep the KV-cache-free reference loop short; the half-written
    # questions make an early `?` likely (seed 1: row 0 stops after 4 tokens).
    prompts = [
        "Generate a question about Paris:\nQuestion: What is the capital of",
        "Hi",
        "Generate a question about the Eiffel Tower:\nQuestion: How tall is",
    ]
    prompt_ids, prompt_mask = encode(smol_tokenizer, prompts)
    batch = sample(smollm2, prompt_ids, prompt_mask, cfg, seeded(1))
    check_invariants(batch, cfg)
    assert int(batch.lengths.min()) < cfg.max_len, "no early termination in this batch"
    assert_scores_match(smollm2, prompt_ids, prompt_mask, batch, cfg)


def plain_config(tokenizer, **kw) -> SamplerConfig:
    base = dict(
        termination_token_id=tokenizer.convert_tokens_to_ids("?"),
        pad_token_id=tokenizer.pad_token_id,
        min_len=2,
        max_len=8,
    )
    base.update(kw)
    return SamplerConfig(**base)


def test_invariants_and_forced_termination(tiny_llama, smol_tokenizer):
    prompt_ids, prompt_mask = encode(smol_tokenizer)
    cfg = plain_config(smol_tokenizer, min_len=8, max_len=8)  # min_len == max_len: exact length
    batch = sample(tiny_llama, prompt_ids, prompt_mask, cfg, seeded(1))
    check_invariants(batch, cfg)
    assert batch.lengths.tolist() == [8] * len(PROMPTS)
    assert bool((batch.log_pf[:, -1] == 0).all())  # forced termination has probability 1


def test_min_len_masks_a_likely_termination(tiny_llama, smol_tokenizer):
    """Greedy decoding with termination = the greedy first token: without the min_len mask
    every row would stop at once."""
    prompt_ids, prompt_mask = encode(smol_tokenizer, PROMPTS[:1])
    probe = sample(tiny_llama, prompt_ids, prompt_mask, plain_config(smol_tokenizer, top_k=1))
    term = int(probe.actions[0, 0])
    free = plain_config(smol_tokenizer, top_k=1, min_len=0, termination_token_id=term)
    assert sample(tiny_llama, prompt_ids, prompt_mask, free).lengths.tolist() == [1]
    cfg = plain_config(smol_tokenizer, top_k=1, min_len=3, termination_token_id=term)
    batch = sample(tiny_llama, prompt_ids, prompt_mask, cfg)
    check_invariants(batch, cfg)
    assert int(batch.actions[0, 0]) != term and int(batch.lengths[0]) >= 4
    log_pf, log_pterm = score_actions(tiny_llama, prompt_ids, prompt_mask, batch.actions, cfg)
    torch.testing.assert_close(log_pf, batch.log_pf, atol=ATOL, rtol=0)
    torch.testing.assert_close(log_pterm, batch.log_pterm, atol=ATOL, rtol=0)


def test_same_seed_same_samples_other_seed_differs(tiny_llama, smol_tokenizer):
    prompt_ids, prompt_mask = encode(smol_tokenizer)
    cfg = plain_config(smol_tokenizer)
    rng_before = torch.random.get_rng_state()
    a = sample(tiny_llama, prompt_ids, prompt_mask, cfg, seeded(7))
    b = sample(tiny_llama, prompt_ids, prompt_mask, cfg, seeded(7))
    c = sample(tiny_llama, prompt_ids, prompt_mask, cfg, seeded(8))
    assert torch.equal(torch.random.get_rng_state(), rng_before), "global RNG was used"
    assert torch.equal(a.actions, b.actions) and torch.equal(a.log_pf, b.log_pf)
    assert not torch.equal(a.actions, c.actions)


def test_banned_tokens_never_sampled(tiny_gpt2, smol_tokenizer):
    prompt_ids, prompt_mask = encode(smol_tokenizer)
    banned = list(range(0, 40000))  # most of the vocabulary
    term = smol_tokenizer.convert_tokens_to_ids("?")
    banned.remove(term)
    for penalty in (1e4, math.inf):
        cfg = plain_config(smol_tokenizer, banned_token_ids=banned, ban_penalty=penalty)
        batch = sample(tiny_gpt2, prompt_ids, prompt_mask, cfg, seeded(0))
        drawn = batch.actions[batch.action_mask]
        assert bool(((drawn >= 40000) | (drawn == term)).all())
        # log_pf is that of the penalised policy: the mass of 40k tokens is removed.
        assert bool((batch.log_pf[batch.action_mask] > -math.log(9152) - 3).all())


def test_top_k_one_and_tiny_top_p_are_greedy(tiny_llama, smol_tokenizer):
    prompt_ids, prompt_mask = encode(smol_tokenizer)
    greedy = plain_config(smol_tokenizer, top_k=1)
    a = sample(tiny_llama, prompt_ids, prompt_mask, greedy, seeded(0))
    b = sample(tiny_llama, prompt_ids, prompt_mask, greedy, seeded(1))
    c = sample(
        tiny_llama, prompt_ids, prompt_mask, plain_config(smol_tokenizer, top_p=1e-6), seeded(2)
    )
    assert torch.equal(a.actions, b.actions) and torch.equal(a.actions, c.actions)
    # Each greedy action is the mode of the (untempered, masked) policy.
    cfg = plain_config(smol_tokenizer)
    with torch.no_grad():
        for t in range(a.actions.shape[1] - 1):
            ids = torch.cat([prompt_ids, a.actions[:, :t]], 1)
            mask = torch.cat([prompt_mask, torch.ones_like(a.actions[:, :t])], 1)
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            logits = tiny_llama(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
            if t < cfg.min_len:
                logits[:, cfg.termination_token_id] = -math.inf
            assert torch.equal(logits.argmax(-1), a.actions[:, t])


def test_sampling_uses_kv_cache_under_gradient_checkpointing(tiny_gpt2, smol_tokenizer):
    """GPT-2 drops its cache in train mode with checkpointing on: sample must not."""
    prompt_ids, prompt_mask = encode(smol_tokenizer)
    cfg = plain_config(smol_tokenizer)
    expected = sample(tiny_gpt2, prompt_ids, prompt_mask, cfg, seeded(4))
    tiny_gpt2.base_model.model.gradient_checkpointing_enable()
    tiny_gpt2.train()
    try:
        got = sample(tiny_gpt2, prompt_ids, prompt_mask, cfg, seeded(4))
        assert tiny_gpt2.training and tiny_gpt2.base_model.model.transformer.h[0].training
        assert tiny_gpt2.base_model.model.transformer.gradient_checkpointing
    finally:
        tiny_gpt2.base_model.model.gradient_checkpointing_disable()
        tiny_gpt2.eval()
    assert torch.equal(got.actions, expected.actions)
    torch.testing.assert_close(got.log_pf, expected.log_pf, atol=ATOL, rtol=0)


def test_score_actions_is_differentiable_wrt_lora(tiny_llama, smol_tokenizer):
    prompt_ids, prompt_mask = encode(smol_tokenizer)
    cfg = plain_config(smol_tokenizer)
    batch = sample(tiny_llama, prompt_ids, prompt_mask, cfg, seeded(0))
    assert not batch.log_pf.requires_grad
    log_pf, log_pterm, hidden = score_actions(
        tiny_llama, prompt_ids, prompt_mask, batch.actions, cfg, return_prompt_hidden=True
    )
    assert hidden.shape == (len(PROMPTS), prompt_ids.shape[1], 64)
    torch.testing.assert_close(log_pf, batch.log_pf, atol=ATOL, rtol=0)
    tiny_llama.zero_grad(set_to_none=True)
    (log_pf.sum() + log_pterm.sum() + hidden.mean()).backward()
    lora = {n: p for n, p in tiny_llama.named_parameters() if "lora_" in n}
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
    frozen = [p for n, p in tiny_llama.named_parameters() if "lora_" not in n]
    assert all(not p.requires_grad and p.grad is None for p in frozen)
    tiny_llama.zero_grad(set_to_none=True)


def test_left_padding_does_not_change_log_probs(tiny_gpt2, smol_tokenizer):
    prompt_ids, prompt_mask = encode(smol_tokenizer)
    cfg = plain_config(smol_tokenizer)
    batch = sample(tiny_gpt2, prompt_ids, prompt_mask, cfg, seeded(0))
    for b in range(len(PROMPTS)):
        real = prompt_mask[b].bool()
        alone_pf, _ = score_actions(
            tiny_gpt2, prompt_ids[b : b + 1, real], prompt_mask[b : b + 1, real],
            batch.actions[b : b + 1], cfg,
        )  # fmt: skip
        torch.testing.assert_close(alone_pf[0], batch.log_pf[b], atol=ATOL, rtol=0)


def test_bad_inputs(tiny_llama, smol_tokenizer):
    term = smol_tokenizer.convert_tokens_to_ids("?")
    with pytest.raises(ValueError, match="min_len"):
        SamplerConfig(termination_token_id=term, pad_token_id=2, min_len=9, max_len=8)
    with pytest.raises(ValueError, match="temperature"):
        SamplerConfig(termination_token_id=term, pad_token_id=2, temperature=0)
    with pytest.raises(ValueError, match="termination token"):
        SamplerConfig(termination_token_id=term, pad_token_id=2, banned_token_ids=[term])
    right = smol_tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="right")
    with pytest.raises(ValueError, match="LEFT-padded"):
        sample(tiny_llama, right.input_ids, right.attention_mask, plain_config(smol_tokenizer))
    ids, mask = encode(smol_tokenizer)
    with pytest.raises(ValueError, match="max_len"):
        score_actions(
            tiny_llama, ids, mask, torch.zeros(4, 9, dtype=torch.long), plain_config(smol_tokenizer)
        )
    with pytest.raises(ValueError, match="lengths or termination_token_id"):
        token_logprobs(tiny_llama, ids, mask, torch.zeros(4, 3, dtype=torch.long))


def test_sample_batch_helpers(tiny_llama, smol_tokenizer):
    prompt_ids, prompt_mask = encode(smol_tokenizer)
    batch = sample(tiny_llama, prompt_ids, prompt_mask, plain_config(smol_tokenizer), seeded(0))
    text = batch.generated_text
    assert text.shape == (4, prompt_ids.shape[1] + batch.actions.shape[1])
    assert torch.equal(text[:, prompt_ids.shape[1] :], batch.actions)
    moved = batch.to("cpu")
    assert all(
        torch.equal(getattr(moved, f.name), getattr(batch, f.name))
        for f in dataclasses.fields(batch)
    )
    assert len(batch) == 4


def test_default_banned_tokens(smol_tokenizer):
    term = smol_tokenizer.convert_tokens_to_ids("?")
    banned = default_banned_token_ids(smol_tokenizer, term)
    newline = smol_tokenizer.encode("\n", add_special_tokens=False)
    assert set(newline) <= set(banned)
    assert smol_tokenizer.eos_token_id in banned and term not in banned
    assert smol_tokenizer.convert_tokens_to_ids("Paris") not in banned


def test_draw_tokens_follows_probs_and_accepts_a_generator_on_another_device():
    """Training draws with CPU step generators whatever the model's device: on CUDA the draw
    moves to the generator's device and gives the CPU's tokens (the GPU check caught
    ``torch.multinomial`` refusing the mix)."""
    probs = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5]]).repeat(200, 1)
    tokens = draw_tokens(probs, seeded(0))
    assert tokens.dtype == torch.long and tokens.shape == (400,)
    assert bool((tokens[0::2] == 1).all()) and set(tokens[1::2].tolist()) == {0, 2}
    assert torch.equal(tokens, draw_tokens(probs, seeded(0)))
    if torch.cuda.is_available():  # the device run of this test (no GPU in CI)
        on_gpu = draw_tokens(probs.cuda(), seeded(0))
        assert on_gpu.device.type == "cuda" and torch.equal(on_gpu.cpu(), tokens)


def test_the_gpus_sync_schedule_samples_the_same(tiny_llama, smol_tokenizer):
    """Looking at the rows once per 8 steps (a GPU's schedule, contraq.syncs) instead of every
    step gives the same batch: the steps after every row ended are cut off again."""
    ids, mask = encode(smol_tokenizer, PROMPTS[:1])
    cfg = plain_config(smol_tokenizer, min_len=2, max_len=12)
    probe = sample(tiny_llama, ids, mask, cfg, seeded(0))
    term = int(probe.actions[0, 3])  # the token drawn at step 3 ends the row when drawn again
    banned = [t for t in cfg.banned_token_ids if t != term]
    cfg = dataclasses.replace(cfg, termination_token_id=term, banned_token_ids=banned)
    a = sample(tiny_llama, ids, mask, cfg, seeded(0))
    assert a.actions.shape[1] < cfg.max_len
    with checking_every(8):
        b = sample(tiny_llama, ids, mask, cfg, seeded(0))
    for name in ("actions", "lengths", "log_pf", "log_pterm"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_device_generator_keeps_the_callers_stream():
    """A generator already on the sampler's device is used as it is; on another device one
    draw of it seeds the device's own (no probabilities copied to the host per token)."""
    gen = seeded(0)
    assert device_generator(gen, "cpu") is gen and device_generator(None, "cpu") is None
    if torch.cuda.is_available():  # the device run of this test (no GPU in CI)
        state = gen.get_state()
        on_gpu = device_generator(gen, "cuda")
        assert on_gpu.device.type == "cuda" and not torch.equal(gen.get_state(), state)
        again = device_generator(seeded(0), "cuda")
        assert torch.equal(
            torch.rand(4, generator=on_gpu, device="cuda"),
            torch.rand(4, generator=again, device="cuda"),
        )
