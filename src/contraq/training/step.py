"""One training step's data: the plan the DataLoader yields and the batch the module builds.

A step's random choices that need no model come first, as a :class:`StepPlan` drawn from
``(seed, step)`` by :func:`plan_step` and streamed by :class:`StepPlans` through the DataLoader;
the module turns a plan into a :class:`StepBatch` (sampling and reward need the model), which
``training.distributed`` may hand across ranks and the callbacks read from
``on_train_batch_end``'s ``outputs["step_batch"]``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from contraq.data import EditFact
from contraq.lm.sampling import SampleBatch
from contraq.reward.base import RewardOutput


def step_generator(seed: int, *parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from (seed, *parts) by a stable digest.

    Every random choice of step s is drawn from ``step_generator(seed, s, ...)``: a resumed run
    continues the exact same random stream without storing RNG state, and no global RNG is
    re-seeded.
    """
    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return g


def pick_facts(seed: int, step: int, rank: int, pool: list[int], n: int) -> list[int]:
    """At most ``n`` of ``pool``, without replacement, from ``step_generator(seed, step, rank, 0)``."""
    g = step_generator(seed, step, rank, 0)
    n = min(n, len(pool))
    return [pool[j] for j in torch.randperm(len(pool), generator=g)[:n].tolist()]


@dataclass(frozen=True)
class StepPlan:
    """What a step draws without the model: the same on every rank.

    Attributes:
        step: the step index (``global_step * accumulate_grad_batches`` + micro-batch).
        replay: the replay coin (``step_generator(seed, step, 3)`` < ``train.replay.prob``).
        facts: for each rank r of the world, its slice's fact ids for a sampled step (also the
            fallback of a replay step whose facts have no buffer entry). A replay step's facts
            depend on the buffer's contents, so the module picks those.
    """

    step: int
    replay: bool
    facts: tuple[tuple[int, ...], ...]


def plan_step(
    seed: int, step: int, n_facts: int, facts_per_step: int, replay_prob: float, world: int = 1
) -> StepPlan:
    """The plan of ``step``: the replay coin and every rank's sampled facts."""
    coin = step_generator(seed, step, 3)
    replay = torch.rand((), generator=coin).item() < replay_prob
    pool = list(range(n_facts))
    facts = tuple(tuple(pick_facts(seed, step, r, pool, facts_per_step)) for r in range(world))
    return StepPlan(step=step, replay=replay, facts=facts)


class StepPlans(torch.utils.data.IterableDataset):
    """Endless plans from ``first_step()`` on, read when iteration starts: after a checkpoint
    is restored, so a resumed run continues the same stream without any loader state."""

    def __init__(self, plan: Callable[[int], StepPlan], first_step: Callable[[], int]) -> None:
        self.plan, self.first_step = plan, first_step

    def __iter__(self) -> Iterator[StepPlan]:
        step = self.first_step()
        while True:
            yield self.plan(step)
            step += 1


@dataclass(frozen=True)
class StepBatch:
    """One rank's training data for a step (B rows, fact-major; P prompt, T action tokens).

    Attributes:
        step: the step index.
        batch: the questions (``prompt_ids``/``prompt_mask`` [B, P], ``actions`` [B, T],
            ``lengths`` [B], ``log_pf``/``log_pterm`` [B, T]; zeros for replayed rows).
        facts: the edit fact of each row (B).
        fact_rows: each row's index into the training facts (B).
        log_r: unscaled log-rewards [B].
        prefix_log_r: every prefix's log-reward [B, T] (SubTB), else None.
        reward_out: the reward's output for these rows (answers, components), None on replay
            steps and on the ranks that received their rows from rank 0.
        slices: the row range ``[start, stop)`` of each drawn rank slice (one on a trained rank).
        replay: whether the rows came from the replay buffer.
        pf_temperature: the sampling temperature (None on replay steps).
        base_draw: whether the base LM drew the rows (None where unknown: replay, other ranks).
        global_batch: under ``rank0`` sampling, everything rank 0 drew (on rank 0), else None.
    """

    step: int
    batch: SampleBatch
    facts: tuple[EditFact, ...]
    fact_rows: tuple[int, ...]
    log_r: Tensor
    prefix_log_r: Tensor | None
    reward_out: RewardOutput | None
    slices: tuple[tuple[int, int], ...]
    replay: bool
    pf_temperature: float | None = None
    base_draw: bool | None = None
    global_batch: SampleBatch | None = None

    def stats(self) -> dict[str, float]:
        """The step's logged settings (``train/replay``, ``pf_temperature``, ``base_draw``)."""
        out = {"replay": float(self.replay)}
        if self.pf_temperature is not None:
            out["pf_temperature"] = self.pf_temperature
        if self.base_draw is not None:
            out["base_draw"] = float(self.base_draw)
        return out
