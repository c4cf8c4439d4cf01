"""Stochastic beam search draws distinct questions exactly as sampling without replacement."""

from __future__ import annotations

import itertools
import math

import mpmath
import pytest
import torch

from contraq.lm.sampling import SamplerConfig, default_banned_token_ids, score_actions
from contraq.lm.stochastic_beam import log1mexp, sample_distinct, truncated_gumbel
from contraq.syncs import checking_every

PROMPTS = ["Generate a question about Paris:\nQuestion:", "Tell me"]


def encode(tokenizer, prompts):
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


def small_cfg(tokenizer, **kw) -> SamplerConfig:
    base = dict(
        termination_token_id=30,  # '?'
        pad_token_id=tokenizer.pad_token_id,
        min_len=1,
        max_len=3,
        temperature=1.0,
        banned_token_ids=default_banned_token_ids(tokenizer, 30),
    )
    base.update(kw)
    return SamplerConfig(**base)


def exact_questions(model, ids, mask, cfg: SamplerConfig) -> dict[tuple[int, ...], float]:
    """Every question of the sampling distribution and its probability, enumerated by full
    forward passes (no cache), masks and top-k applied by hand."""
    real = ids[0][mask[0].bool()]
    term = cfg.termination_token_id
    out: dict[tuple[int, ...], float] = {}

    def expand(prefix: tuple[int, ...], logp: float) -> None:
        t = len(prefix)
        x = torch.cat([real, torch.tensor(prefix, dtype=torch.long)])[None]
        with torch.no_grad():
            logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].float()
        logits = logits.clone()
        logits[cfg.banned_token_ids] -= cfg.ban_penalty
        if t >= cfg.max_len - 1:
            keep = logits[term].clone()
            logits[:] = -math.inf
            logits[term] = keep
        elif t < cfg.min_len:
            logits[term] = -math.inf
        logits = logits / cfg.temperature
        if cfg.top_k:
            kth = logits.topk(cfg.top_k).values[-1]
            logits[logits < kth] = -math.inf
        lp = torch.log_softmax(logits, -1)
        for tok in torch.nonzero(torch.isfinite(lp)).flatten().tolist():
            seq, p = (*prefix, tok), logp + float(lp[tok])
            if tok == term:
                out[seq] = math.exp(p)
            else:
                expand(seq, p)

    expand((), 0.0)
    return out


def rows_of(batch, b: int) -> tuple[int, ...]:
    return tuple(batch.actions[b, : int(batch.lengths[b])].tolist())


def test_log1mexp_and_truncated_gumbel():
    x = torch.tensor([-1e-8, -0.1, -0.7, -5.0, -50.0, -math.inf], dtype=torch.float64)
    ref = [float(mpmath.log(1 - mpmath.exp(mpmath.mpf(v)))) for v in x[:-1].tolist()]
    torch.testing.assert_close(log1mexp(x[:-1]), torch.tensor(ref, dtype=torch.float64))
    assert log1mexp(x[-1:]).item() == 0.0
    gen = torch.Generator().manual_seed(0)
    perturbed = torch.randn(5, 7, generator=gen, dtype=torch.float64) * 3
    perturbed[0, 2] = -math.inf
    parent = torch.randn(5, 1, generator=gen, dtype=torch.float64)
    out = truncated_gumbel(parent, perturbed)
    # The largest child takes the parent's value, the order of the children is kept, and a
    # child that cannot occur stays impossible.
    torch.testing.assert_close(out.max(-1, keepdim=True).values, parent)
    assert torch.equal(out.argsort(-1)[1:], perturbed.argsort(-1)[1:])
    assert out[0, 2] == -math.inf and bool((out <= parent).all())
    ref = -torch.log(
        torch.exp(-parent)
        - torch.exp(-perturbed.max(-1, keepdim=True).values)
        + torch.exp(-perturbed)
    )
    torch.testing.assert_close(out[1:], ref[1:])


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_distinct_and_log_probs_as_teacher_forced(arch, request, smol_tokenizer):
    model = request.getfixturevalue(arch)
    ids, mask = encode(smol_tokenizer, PROMPTS)
    cfg = small_cfg(smol_tokenizer, min_len=2, max_len=6, temperature=1.3, top_k=50)
    out = sample_distinct(model, ids, mask, cfg, k=6, generator=torch.Generator().manual_seed(1))
    batch = out.batch
    assert len(batch) == 12 and bool(out.valid.all())
    for p in range(2):
        seqs = [rows_of(batch, p * 6 + j) for j in range(6)]
        assert len(set(seqs)) == 6, seqs
        keys = out.keys[p * 6 : p * 6 + 6]
        assert bool((keys[:-1] >= keys[1:]).all()), "not in drawing order"
        assert torch.equal(batch.prompt_ids[p * 6], ids[p])
    # log P_F as the untempered policy's, as the sampler stores it.
    log_pf, log_pterm = score_actions(
        model, batch.prompt_ids, batch.prompt_mask, batch.actions, cfg
    )
    torch.testing.assert_close(batch.log_pf, log_pf, atol=1e-4, rtol=0)
    torch.testing.assert_close(batch.log_pterm, log_pterm, atol=1e-4, rtol=0)
    assert bool((batch.actions[torch.arange(12), batch.lengths - 1] == 30).all())


def test_matches_sampling_without_replacement_by_enumeration(tiny_llama, smol_tokenizer):
    """Brute force: the distribution of the first question and of the unordered pair drawn by
    k=2 equals sampling two without replacement from the enumerated question distribution."""
    ids, mask = encode(smol_tokenizer, ["Tell me"])
    cfg = small_cfg(smol_tokenizer, temperature=1.5, top_k=3)
    probs = exact_questions(tiny_llama, ids, mask, cfg)
    assert 4 <= len(probs) <= 9 and abs(sum(probs.values()) - 1) < 1e-5
    reps, calls = 150, 12
    gen = torch.Generator().manual_seed(0)
    first: dict[tuple, int] = {}
    pairs: dict[frozenset, int] = {}
    for _ in range(calls):
        out = sample_distinct(
            tiny_llama, ids.repeat(reps, 1), mask.repeat(reps, 1), cfg, k=2, generator=gen
        )
        for r in range(reps):
            a, b = rows_of(out.batch, 2 * r), rows_of(out.batch, 2 * r + 1)
            assert a != b and a in probs and b in probs
            first[a] = first.get(a, 0) + 1
            pairs[frozenset((a, b))] = pairs.get(frozenset((a, b)), 0) + 1
    n = reps * calls
    for seq, p in probs.items():
        sd = math.sqrt(p * (1 - p) / n)
        assert abs(first.get(seq, 0) / n - p) < 4 * sd + 1e-3, (seq, first.get(seq, 0) / n, p)
    for a, b in itertools.combinations(probs, 2):
        pa, pb = probs[a], probs[b]
        p = pa * pb / (1 - pa) + pb * pa / (1 - pb)
        got = pairs.get(frozenset((a, b)), 0) / n
        assert abs(got - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3, (a, b, got, p)


def test_output_depends_on_generator_and_temperature(tiny_gpt2, smol_tokenizer):
    ids, mask = encode(smol_tokenizer, PROMPTS)
    cfg = small_cfg(smol_tokenizer, min_len=2, max_len=6, top_k=50)

    def draw(seed, c=cfg):
        out = sample_distinct(
            tiny_gpt2, ids, mask, c, k=4, generator=torch.Generator().manual_seed(seed)
        )
        return [rows_of(out.batch, b) for b in range(8)]

    assert draw(0) == draw(0)
    assert draw(0) != draw(1)
    # top_k=1 leaves one question per prompt: the other beams are invalid, never repeats.
    one = sample_distinct(
        tiny_gpt2, ids, mask, small_cfg(smol_tokenizer, top_k=1), k=3, generator=None
    )
    assert one.valid.view(2, 3).sum(1).tolist() == [1, 1]


def test_bad_k(tiny_gpt2, smol_tokenizer):
    ids, mask = encode(smol_tokenizer, PROMPTS)
    with pytest.raises(ValueError, match="k must be"):
        sample_distinct(tiny_gpt2, ids, mask, small_cfg(smol_tokenizer), k=0)


def test_the_gpus_sync_schedule_draws_the_same(tiny_llama, smol_tokenizer):
    """Looking at the beams once per 8 steps (a GPU's schedule, contraq.syncs) instead of
    every step gives the same batch: the steps after every beam ended change nothing."""
    ids, mask = encode(smol_tokenizer, PROMPTS)
    cfg = small_cfg(smol_tokenizer, max_len=6)
    a = sample_distinct(tiny_llama, ids, mask, cfg, 3, generator=torch.Generator().manual_seed(1))
    with checking_every(8):
        b = sample_distinct(
            tiny_llama, ids, mask, cfg, 3, generator=torch.Generator().manual_seed(1)
        )
    assert torch.equal(a.valid, b.valid) and torch.equal(a.keys, b.keys)
    for name in ("actions", "lengths", "log_pf", "log_pterm"):
        got, want = getattr(b.batch, name)[a.valid], getattr(a.batch, name)[a.valid]
        assert torch.equal(got, want), name
