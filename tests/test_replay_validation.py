"""Replay entries read back from a real Redis are checked against the model (issue 9, case 7):
a token id beyond the vocabulary, an entry longer than max_len or a huge log_r is dropped,
counted and named (its Redis key) instead of crashing or poisoning the loss."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from contraq.buffer import BufferEntry, RedisBuffer
from contraq.config.schema import LossConfig, ReplayConfig, TrainConfig
from contraq.data import EditFact
from contraq.lm.models import termination_token_id
from contraq.lm.sampling import SamplerConfig
from contraq.reward.likelihood import LikelihoodReward
from contraq.training.module import GFlowNetModule
from redis_fixtures import RedisHandle, redis_handle  # noqa: F401

pytestmark = pytest.mark.redis

MAX_LEN = 8


def _module(policy: torch.nn.Module, tok: object, buffer: RedisBuffer) -> GFlowNetModule:
    term = termination_token_id(tok, "?")
    fact = EditFact(subject="Colt King Cobra", edit_fact="Colt King Cobra is made by Ford")
    prompt = tok("Generate a question about Colt King Cobra:\nQuestion:")["input_ids"]
    return GFlowNetModule(
        policy=policy,
        tokenizer=tok,
        facts=[fact],
        prompts=[prompt],
        reward=LikelihoodReward(policy, tok, term),
        buffer=buffer,
        sampler_cfg=SamplerConfig(
            termination_token_id=term, pad_token_id=tok.pad_token_id, min_len=2, max_len=MAX_LEN
        ),
        cfg=TrainConfig(
            facts_per_step=1, n_samples=6, replay=ReplayConfig(prob=1.0), pf_temp_prob=0.0
        ),
        loss_cfg=LossConfig(),
        seed=0,
    )


def test_invalid_replay_entries_are_dropped_counted_and_named(
    redis_handle: RedisHandle,  # noqa: F811
    tiny_llama: torch.nn.Module,
    smol_tokenizer: object,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tok = smol_tokenizer
    buffer = redis_handle.buffer()
    module = _module(tiny_llama, tok, buffer)
    term, key = module.sampler_cfg.termination_token_id, module.prompt_keys[0]
    vocab = len(tok)
    good = BufferEntry([100, 200, term], -12.0, {"log_pq": -12.0}, "good?")
    bad = [
        BufferEntry([vocab + 5, term], -1.0, {}, "beyond the vocabulary?"),
        BufferEntry([300 + i for i in range(MAX_LEN + 4)] + [term], -2.0, {}, "too long?"),
        BufferEntry([7000, 7001, term], 1e300, {}, "huge reward?"),
    ]
    # Written through a second client, as another process sharing the namespace would.
    other = RedisBuffer(port=redis_handle.port, namespace=buffer.namespace)
    assert other.add(key, [good, *bad]) == 4

    with caplog.at_level(logging.WARNING, logger="contraq.buffer"):
        data = module.make_batch(module.plan(0))
        loss, _ = module.compute_loss(data)
    assert data.replay
    assert all(e == [100, 200, term] for e in data.batch.actions[:, :3].tolist())
    assert torch.isfinite(data.log_r).all() and math.isfinite(loss.item())
    assert buffer.dropped == 3
    where = f"Redis key '{buffer.namespace}:buf:{key}:h'"
    warnings = [r.getMessage() for r in caplog.records if where in r.getMessage()]
    assert len(warnings) == 3, caplog.text
    text = " ".join(warnings)
    assert "vocabulary size" in text and "sampler.max_len" in text and "log_r" in text
    # Each bad entry is warned about once, not at every replay.
    with caplog.at_level(logging.WARNING, logger="contraq.buffer"):
        module.make_batch(module.plan(1))
    assert sum(where in r.getMessage() for r in caplog.records) == 3


def test_a_fact_with_only_invalid_entries_is_sampled_on_policy(
    redis_handle: RedisHandle,  # noqa: F811
    tiny_llama: torch.nn.Module,
    smol_tokenizer: object,
) -> None:
    buffer = redis_handle.buffer()
    module = _module(tiny_llama, smol_tokenizer, buffer)
    term, key = module.sampler_cfg.termination_token_id, module.prompt_keys[0]
    buffer.add(key, [BufferEntry([len(smol_tokenizer) + 1, term], -1.0, {}, "bad?")])
    data = module.make_batch(module.plan(0))
    loss, _ = module.compute_loss(data)
    assert not data.replay and math.isfinite(loss.item())
    assert buffer.dropped == 1


def test_unterminated_garbage_and_mistyped_redis_entries_are_skipped(
    redis_handle: RedisHandle,  # noqa: F811
    tiny_llama: torch.nn.Module,
    smol_tokenizer: object,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 28 case 4: an entry without the termination token raised "trajectory balance
    needs complete trajectories" at every relaunch; garbage JSON or a field of the wrong type
    stopped every read of the key. All three are skipped, counted and named once."""
    import redis

    buffer = redis_handle.buffer()
    module = _module(tiny_llama, smol_tokenizer, buffer)
    term, key = module.sampler_cfg.termination_token_id, module.prompt_keys[0]
    good = BufferEntry([100, 200, term], -12.0, {"log_pq": -12.0}, "good?")
    unterminated = BufferEntry([5, 6, 30], -10.0, {}, "no end")
    assert buffer.add(key, [good, unterminated]) == 2
    client = redis.Redis(port=redis_handle.port)
    zkey, hkey = f"{buffer.namespace}:buf:{key}:z", f"{buffer.namespace}:buf:{key}:h"
    mistyped = b'{"token_ids": "5", "log_r": -2.0, "components": {}, "text": "x"}'
    client.hset(hkey, mapping={"garbage": b"{not json", "mistyped": mistyped})
    client.zadd(zkey, {"garbage": -1.0, "mistyped": -2.0})

    with caplog.at_level(logging.WARNING, logger="contraq.buffer"):
        for step in range(3):
            data = module.make_batch(module.plan(step))
            loss, _ = module.compute_loss(data)
            assert data.replay and math.isfinite(loss.item())
            assert all(e == [100, 200, term] for e in data.batch.actions[:, :3].tolist())
    assert buffer.dropped == 3
    warnings = [r.getMessage() for r in caplog.records if f"Redis key '{hkey}'" in r.getMessage()]
    assert len(warnings) == 3, caplog.text  # once each, not at every replay
    text = " ".join(warnings)
    assert "termination token" in text and "not valid entry JSON" in text and "token_ids" in text
