"""Several processes (DDP): how a step's batch reaches every rank (scatter/pack of batches).

The module draws a :class:`~contraq.training.step.StepBatch` for the slices
:func:`slices_to_draw` names and :func:`share_batch` hands each rank its rows.

Three sampling modes (``train.sampling``, docs/DESIGN.md section 5):

- ``per_rank``: every rank samples and scores its own slice (the facts and the sampling RNG
  derive from ``(seed, step, global_rank)``); each rank holds the reward models; with
  ``buffer=redis`` the ranks share one replay buffer.
- ``rank0``: rank 0 samples ``world_size`` slices in one batch, scores them, and SCATTERS one
  slice to each rank, so N ranks learn from N different slices. Other ranks never compute a
  reward (they need no reward model). Only plain tensors cross process boundaries
  (``torch.distributed.broadcast``/``scatter`` of padded int64/float64 tensors; no pickle).
- ``rank0_broadcast``: the seed's design, kept as a benchmark baseline: rank 0 samples one
  slice and every rank trains on that same slice (N processes, one process's learning).

What must agree across ranks agrees: the replay/sample coin of a step depends on
``(seed, step)`` only (``training.step.plan_step``), the reward temperature and learning-rate
schedules on the global step; DDP averages the LoRA (and log Z) gradients, so the optimizer
steps stay identical. Starting the processes is :mod:`contraq.training.launch`'s business.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from contraq.data import EditFact
from contraq.lm.sampling import SampleBatch
from contraq.reward.base import RewardOutput
from contraq.training.step import StepBatch

SAMPLING_MODES = ("per_rank", "rank0", "rank0_broadcast")

# Header layout (int64): P, T, has_prefix, replay, then one row count per rank.
_HEADER_FIXED = 4


def dist_ready() -> bool:
    """Whether a torch.distributed process group is up (any world size)."""
    return dist.is_available() and dist.is_initialized()


def comm_device(model_device: torch.device) -> torch.device:
    """Where collective tensors live: the model's GPU under NCCL, else CPU (gloo)."""
    if dist_ready() and dist.get_backend() == "nccl":
        return model_device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Config checks and launch plumbing (called by train.run_training)
# --------------------------------------------------------------------------------------------


def check_sampling(mode: str) -> str:
    """``mode`` if it names a sampling mode, else a ValueError naming ``train.sampling``."""
    if mode not in SAMPLING_MODES:
        raise ValueError(f"train.sampling must be one of {', '.join(SAMPLING_MODES)}; got {mode!r}")
    return mode


def pack_rows(
    batch: SampleBatch, log_r: Tensor, prefix_log_r: Tensor | None, fact_rows: Sequence[int]
) -> tuple[Tensor, Tensor]:
    """One batch as two row-aligned tensors (on CPU).

    Returns:
        longs: ``LongTensor[B, 2P + T + 2]`` = prompt_ids | prompt_mask | actions | length | fact row.
        floats: ``DoubleTensor[B, 2T + 1 (+ T)]`` = log_pf | log_pterm | log_r (| prefix_log_r).
    """
    b = len(batch)
    rows = torch.as_tensor(list(fact_rows), dtype=torch.long).view(b, 1)
    longs = torch.cat(
        [
            batch.prompt_ids.long().cpu(),
            batch.prompt_mask.long().cpu(),
            batch.actions.long().cpu(),
            batch.lengths.long().cpu().view(b, 1),
            rows,
        ],
        dim=1,
    )
    parts = [batch.log_pf, batch.log_pterm, log_r.view(b, 1)]
    if prefix_log_r is not None:
        parts.append(prefix_log_r)
    floats = torch.cat([p.detach().double().cpu() for p in parts], dim=1)
    return longs, floats


def unpack_rows(
    longs: Tensor, floats: Tensor, prompt_len: int, n_actions: int, has_prefix: bool
) -> tuple[SampleBatch, Tensor, Tensor | None, list[int]]:
    """Inverse of :func:`pack_rows` (float parts come back as float32)."""
    p, t = prompt_len, n_actions
    batch = SampleBatch(
        prompt_ids=longs[:, :p],
        prompt_mask=longs[:, p : 2 * p],
        actions=longs[:, 2 * p : 2 * p + t],
        lengths=longs[:, 2 * p + t],
        log_pf=floats[:, :t].float(),
        log_pterm=floats[:, t : 2 * t].float(),
    )
    log_r = floats[:, 2 * t].float()
    prefix = floats[:, 2 * t + 1 : 3 * t + 1].float() if has_prefix else None
    return batch, log_r, prefix, longs[:, 2 * p + t + 1].tolist()


def _pad_rows(x: Tensor, n: int) -> Tensor:
    if x.shape[0] == n:
        return x.contiguous()
    pad = torch.zeros((n - x.shape[0], *x.shape[1:]), dtype=x.dtype)
    return torch.cat([x, pad]).contiguous()


def slice_reward_output(out: RewardOutput, start: int, stop: int) -> RewardOutput:
    """Rows ``[start, stop)`` of a reward output (per-row tensors and lists; others kept)."""
    n = int(out.log_r.shape[0])

    def cut(v: Any) -> Any:
        if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == n:
            return v[start:stop]
        if isinstance(v, list) and len(v) == n:
            return v[start:stop]
        return v

    return dataclasses.replace(
        out,
        log_r=out.log_r[start:stop],
        components={k: cut(v) for k, v in out.components.items()},
        answers=cut(out.answers),
        questions=cut(out.questions),
    )


def slices_to_draw(mode: str, rank: int, world: int) -> list[int]:
    """Whose slices this rank draws under sampling ``mode``: its own (``per_rank`` or one
    process), every rank's (rank 0 under ``rank0``), rank 0's (rank 0 under
    ``rank0_broadcast``), none (the other ranks under rank 0 sampling)."""
    mode = check_sampling(mode)
    if mode == "per_rank" or world == 1:
        return [rank]
    if rank != 0:
        return []
    return list(range(world)) if mode == "rank0" else [0]


def share_batch(
    drawn: StepBatch | None,
    step: int,
    mode: str,
    facts: Sequence[EditFact],
    device: torch.device,
) -> StepBatch:
    """This rank's training rows of ``step`` under sampling ``mode`` (``train.sampling``), on
    ``device``.

    ``drawn``: what this rank drew (the slices of :func:`slices_to_draw`), None where it drew
    none. ``per_rank`` (or no process group): ``drawn`` itself. ``rank0`` /
    ``rank0_broadcast``: two small broadcasts (int64 header ``[4 + world]``: P, T, has_prefix,
    replay, rows per rank; float64 exploration temperature) and two scatters (:func:`pack_rows`
    tensors, padded to the largest slice) hand each rank its rows of rank 0's ``drawn``
    (``facts``: the training facts, to name each received row's fact). ``reward_out``: rank 0's
    slice on rank 0, None elsewhere; ``global_batch``: everything rank 0 drew (rank 0), else None.
    """
    mode = check_sampling(mode)
    if mode == "per_rank" or not dist_ready():
        assert drawn is not None, "every rank draws its own slice"
        return drawn
    world, rank = dist.get_world_size(), dist.get_rank()
    dev = comm_device(device)
    header = torch.zeros(_HEADER_FIXED + world, dtype=torch.long, device=dev)
    temp = torch.full((1,), float("nan"), dtype=torch.float64, device=dev)
    scatter_l: list[Tensor] | None = None
    scatter_f: list[Tensor] | None = None
    if drawn is not None:  # rank 0
        bounds = list(drawn.slices) if mode == "rank0" else list(drawn.slices) * world
        longs, floats = pack_rows(drawn.batch, drawn.log_r, drawn.prefix_log_r, drawn.fact_rows)
        counts = [b - a for a, b in bounds]
        width = max(counts)
        scatter_l = [_pad_rows(longs[a:b], width).to(dev) for a, b in bounds]
        scatter_f = [_pad_rows(floats[a:b], width).to(dev) for a, b in bounds]
        p, t = drawn.batch.prompt_ids.shape[1], drawn.batch.actions.shape[1]
        fixed = [p, t, int(drawn.prefix_log_r is not None), int(drawn.replay)]
        header.copy_(torch.tensor(fixed + counts, dtype=torch.long))
        temp_value = drawn.pf_temperature if drawn.pf_temperature is not None else float("nan")
        temp.fill_(float(temp_value))
    dist.broadcast(header, src=0)
    dist.broadcast(temp, src=0)
    p, t, has_prefix, replay = (int(v) for v in header[:_HEADER_FIXED].tolist())
    counts = header[_HEADER_FIXED:].tolist()
    width = max(counts)
    n_long = 2 * p + t + 2
    n_float = 2 * t + 1 + (t if has_prefix else 0)
    recv_l = torch.empty((width, n_long), dtype=torch.long, device=dev)
    recv_f = torch.empty((width, n_float), dtype=torch.float64, device=dev)
    dist.scatter(recv_l, scatter_l, src=0)
    dist.scatter(recv_f, scatter_f, src=0)
    n = counts[rank]
    batch, log_r, prefix, fact_rows = unpack_rows(
        recv_l[:n].cpu(), recv_f[:n].cpu(), p, t, bool(has_prefix)
    )
    reward_out = None
    if drawn is not None and drawn.reward_out is not None:
        reward_out = slice_reward_output(drawn.reward_out, 0, n)
    return StepBatch(
        step=step,
        batch=batch.to(device),
        facts=tuple(facts[i] for i in fact_rows),
        fact_rows=tuple(fact_rows),
        log_r=log_r.to(device),
        prefix_log_r=prefix.to(device) if prefix is not None else None,
        reward_out=reward_out,
        slices=((0, n),),
        replay=bool(replay),
        pf_temperature=None if replay else float(temp.item()),
        base_draw=drawn.base_draw if drawn is not None else None,
        global_batch=drawn.batch if drawn is not None else None,
    )
