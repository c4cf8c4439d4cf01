"""contraq.training.step: the plans the DataLoader yields and the step batch the callbacks read
from ``on_train_batch_end``'s outputs (issue 27 item 5)."""

from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path

import lightning as L
import torch

from contraq.data import EditFact
from contraq.lm.sampling import SampleBatch
from contraq.reward.base import RewardOutput
from contraq.training.callbacks import SampleWriter, step_batch
from contraq.training.distributed import slices_to_draw
from contraq.training.step import StepBatch, StepPlans, plan_step


def test_plans_start_at_the_step_counter_and_keep_each_ranks_facts() -> None:
    plan = functools.partial(plan_step, 3, n_facts=10, facts_per_step=4, replay_prob=0.5, world=2)
    got = list(itertools.islice(iter(StepPlans(plan, first_step=lambda: 7)), 3))
    assert [p.step for p in got] == [7, 8, 9]
    assert got[0] == plan(step=7)  # a pure function of (seed, step): a resume draws the same
    for p in got:
        assert len(p.facts) == 2 and all(len(set(ids)) == 4 for ids in p.facts)
        assert p.facts[0] != p.facts[1]  # each rank its own slice
        # Rank 0's slice and the coin do not depend on how many ranks there are.
        alone = plan_step(3, p.step, 10, 4, 0.5, world=1)
        assert alone.facts == p.facts[:1] and alone.replay == p.replay
    coins = {plan_step(3, s, 10, 4, 0.5).replay for s in range(40)}
    assert coins == {True, False}
    assert sorted(plan_step(3, 0, 3, 4, 1.0).facts[0]) == [0, 1, 2]  # at most all, each once


def _step_batch() -> StepBatch:
    fact = EditFact(subject="Paris", edit_fact="Paris is the capital of Italy")
    zeros = torch.zeros((2, 3))
    batch = SampleBatch(
        prompt_ids=torch.ones((2, 4), dtype=torch.long),
        prompt_mask=torch.ones((2, 4), dtype=torch.long),
        actions=torch.tensor([[5, 6, 2], [7, 2, 0]]),
        lengths=torch.tensor([3, 2]),
        log_pf=zeros,
        log_pterm=zeros,
    )
    out = RewardOutput(
        log_r=torch.tensor([-1.0, -2.0]),
        components={"log_pq": torch.tensor([-3.0, -4.0])},
        answers=["Rome", "Milan"],
        questions=["Is it?", "Why?"],
    )
    return StepBatch(
        step=0,
        batch=batch,
        facts=(fact, fact),
        fact_rows=(0, 0),
        log_r=out.log_r,
        prefix_log_r=None,
        reward_out=out,
        slices=((0, 2),),
        replay=False,
        pf_temperature=1.0,
        base_draw=False,
    )


def test_sample_writer_reads_the_step_batch_from_the_step_outputs(tmp_path: Path) -> None:
    sb = _step_batch()
    assert sb.stats() == {"replay": 0.0, "pf_temperature": 1.0, "base_draw": 0.0}
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    writer = SampleWriter(tmp_path / "samples.jsonl", every_n_steps=1)
    writer.on_train_batch_end(trainer, None, {"loss": torch.tensor(0.0)}, None, 0)
    assert not (tmp_path / "samples.jsonl").exists()  # no step batch, nothing written
    writer.on_train_batch_end(trainer, None, {"loss": torch.tensor(0.0), "step_batch": sb}, None, 0)
    rows = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [(r["question"], r["answer"], r["log_r"], r["log_pq"]) for r in rows] == [
        ("Is it?", "Rome", -1.0, -3.0),
        ("Why?", "Milan", -2.0, -4.0),
    ]
    assert step_batch(torch.tensor(0.0)) is None and step_batch({"step_batch": sb}) is sb


def test_slices_to_draw_follow_the_sampling_mode() -> None:
    assert slices_to_draw("per_rank", 1, 2) == [1] and slices_to_draw("rank0", 0, 1) == [0]
    assert slices_to_draw("rank0", 0, 3) == [0, 1, 2] and slices_to_draw("rank0", 2, 3) == []
    assert slices_to_draw("rank0_broadcast", 0, 2) == [0]
    assert slices_to_draw("rank0_broadcast", 1, 2) == []
