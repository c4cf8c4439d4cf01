"""How a training step draws its questions: without replacement (``train.draw=distinct``)
and from the base LM (``train.base_prob``)."""

from __future__ import annotations

import pytest
import torch

from contraq.buffer import MemoryBuffer
from contraq.config.schema import LossConfig, ReplayConfig, TrainConfig
from contraq.data import EditFact
from contraq.lm.models import base_model, termination_token_id
from contraq.lm.sampling import SamplerConfig, score_actions
from contraq.reward.likelihood import LikelihoodReward
from contraq.training.module import GFlowNetModule
from contraq.training.step import StepBatch

FACTS = [
    EditFact(subject="Colt King Cobra", edit_fact="Colt King Cobra is made by Ford"),
    EditFact(subject="Danielle Darrieux", edit_fact="Danielle Darrieux speaks English"),
]


def _module(policy, tok, **train) -> GFlowNetModule:
    term = termination_token_id(tok, "?")
    prompts = [tok(f"Ask about {f.subject}:\nQuestion:")["input_ids"] for f in FACTS]
    return GFlowNetModule(
        policy=policy,
        tokenizer=tok,
        facts=FACTS,
        prompts=prompts,
        reward=LikelihoodReward(policy, tok, term),
        buffer=MemoryBuffer(),
        sampler_cfg=SamplerConfig(
            termination_token_id=term,
            pad_token_id=tok.pad_token_id,
            min_len=2,
            max_len=4,
            top_k=2,  # 8 questions per prompt: independent draws repeat
        ),
        cfg=TrainConfig(
            facts_per_step=2, n_samples=6, replay=ReplayConfig(prob=0.0), pf_temp_prob=0.0, **train
        ),
        loss_cfg=LossConfig(),
        seed=0,
    )


def _step0(module: GFlowNetModule) -> StepBatch:
    return module.make_batch(module.plan(0))


def _questions(batch, rows) -> list[tuple[int, ...]]:
    return [tuple(batch.actions[b, : int(batch.lengths[b])].tolist()) for b in rows]


def test_distinct_draws_give_each_fact_distinct_questions(tiny_llama, smol_tokenizer):
    iid = _step0(_module(tiny_llama, smol_tokenizer))
    data = _step0(_module(tiny_llama, smol_tokenizer, draw="distinct"))
    batch = data.batch
    assert len(batch) == 12 and data.fact_rows == iid.fact_rows
    for k in range(2):
        rows = [b for b, f in enumerate(data.fact_rows) if f == data.fact_rows[6 * k]]
        assert rows == list(range(6 * k, 6 * k + 6))
        assert len(set(_questions(batch, rows))) == 6
    # Independent draws of the same policy repeat here: the draw, not the policy, differs.
    assert min(len(set(_questions(iid.batch, range(6 * k, 6 * k + 6)))) for k in (0, 1)) < 6
    # The loss sees the policy's own log-probs of the distinct questions.
    loss, _ = _module(tiny_llama, smol_tokenizer, draw="distinct").compute_loss(data)
    assert torch.isfinite(loss)


@pytest.mark.parametrize(("weights", "atol"), [("shared", 1e-4), ("float16", 2e-3)])
def test_base_draws_come_from_the_base_lm(tiny_llama, smol_tokenizer, weights, atol):
    """Also through the sampler's float16 copy (train.sample_weights), up to its rounding."""
    module = _module(tiny_llama, smol_tokenizer, base_prob=1.0, sample_weights=weights)
    data = _step0(module)
    batch = data.batch
    assert data.base_draw is True and data.pf_temperature == 1.0
    cfg = module.sampler_cfg
    with base_model(tiny_llama) as lm:
        base_pf, _ = score_actions(lm, batch.prompt_ids, batch.prompt_mask, batch.actions, cfg)
    policy_pf, _ = score_actions(
        tiny_llama, batch.prompt_ids, batch.prompt_mask, batch.actions, cfg
    )
    torch.testing.assert_close(batch.log_pf, base_pf, atol=atol, rtol=0)
    assert not torch.allclose(batch.log_pf, policy_pf, atol=1e-3)
    # base_prob=0 (the default) draws from the policy and leaves the step's streams as before.
    plain = _step0(_module(tiny_llama, smol_tokenizer, sample_weights=weights))
    assert plain.base_draw is False
    torch.testing.assert_close(
        plain.batch.log_pf,
        score_actions(
            tiny_llama,
            plain.batch.prompt_ids,
            plain.batch.prompt_mask,
            plain.batch.actions,
            cfg,
        )[0],
        atol=atol,
        rtol=0,
    )
