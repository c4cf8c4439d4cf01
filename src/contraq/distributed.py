"""Several processes (DDP): who samples, how slices reach the ranks, and launch plumbing.

Two sampling modes (``train.sampling``, DESIGN.md section 5):

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
``(seed, step)`` only (``GFlowNetModule.get_batch``), the reward temperature and learning-rate
schedules on the global step; DDP averages the LoRA (and log Z) gradients, so the optimizer
steps stay identical. Rank-0-only writes (samples, fresh evals, adapter, logs, config) are the
callbacks' and ``train.run_training``'s business.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor

from contraq.reward import RewardOutput
from contraq.sampler import SampleBatch

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from contraq.buffer import ReplayBuffer
    from contraq.module import GFlowNetModule

log = logging.getLogger(__name__)

SAMPLING_MODES = ("per_rank", "rank0", "rank0_broadcast")

# Header layout (int64): P, T, has_prefix, replay, then one row count per rank.
_HEADER_FIXED = 4


# --------------------------------------------------------------------------------------------
# Ranks before and after torch.distributed is up
# --------------------------------------------------------------------------------------------


def env_rank() -> int:
    """This process's global rank as the launcher's environment tells it, before
    ``torch.distributed`` is initialised: 0 for a plain run and for the process that Lightning
    itself launches the others from; > 0 for every other rank (torchrun sets ``RANK``;
    Lightning's children get ``LOCAL_RANK`` and ``NODE_RANK``)."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", 0)))
    per_node = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return node * per_node + local


def is_launched_worker() -> bool:
    """True when a launcher (torchrun, or Lightning's rank 0) started this process."""
    return "LOCAL_RANK" in os.environ


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


def prepare(cfg: DictConfig) -> None:
    """Validate the distributed settings and tie a launched worker's life to its launcher.

    torchrun starts workers in their own sessions, so SIGKILL to the launcher's process group
    would leave them training as orphans (writing checkpoints and buffer entries while a
    relaunch runs). ``PR_SET_PDEATHSIG`` makes the kernel SIGKILL a worker when its launcher
    dies, whatever killed the launcher.
    """
    mode = check_sampling(str(cfg.train.sampling))
    if is_launched_worker():
        die_with_parent()
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and mode == "per_rank" and str(cfg.buffer.backend) == "memory":
        log.warning(
            "train.sampling=per_rank with buffer=memory: every rank keeps its own replay buffer "
            "and only rank 0's is checkpointed; use buffer=redis to share it, or "
            "train.sampling=rank0 (only rank 0 touches the buffer)"
        )
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if (
        local_world < world
        and mode == "per_rank"
        and str(cfg.buffer.backend) == "redis"
        and str(cfg.buffer.host) in ("127.0.0.1", "localhost", "::1")
    ):
        log.warning(
            "several nodes with buffer.host=%s: every node talks to its own local Redis, so the "
            "buffer is shared per node only; point buffer.host at one server all nodes reach",
            cfg.buffer.host,
        )


def die_with_parent() -> bool:
    """Ask Linux to SIGKILL this process when its parent dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    if libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d)", ctypes.get_errno())
        return False
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def trainer_kwargs_from_env(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Under torchrun, ``devices: auto`` means the launcher's processes per node and
    ``num_nodes`` its node count (Lightning refuses a mismatch with the launcher)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or "LOCAL_WORLD_SIZE" not in os.environ:
        return kwargs
    out = dict(kwargs)
    local, world = int(os.environ["LOCAL_WORLD_SIZE"]), int(os.environ["WORLD_SIZE"])
    if out.get("devices") in (None, "auto", -1, "-1"):
        out["devices"] = local
    if int(out.get("num_nodes", 1)) * int(out["devices"]) != world:
        out["num_nodes"] = max(1, world // int(out["devices"]))
    return out


def rank_scores(cfg: DictConfig) -> bool:
    """Whether this process computes rewards (and so needs the reward models)."""
    return str(cfg.train.sampling) == "per_rank" or env_rank() == 0


class RankZeroReward:
    """The reward seen by ranks > 0 in ``train.sampling=rank0``: rank 0 scores every slice,
    so these ranks never load the reward models, and calling it is a bug worth a clear error."""

    def _refuse(self, *_: Any, **__: Any) -> Any:
        raise RuntimeError(
            f"rank {env_rank()} was asked for a reward, but with train.sampling=rank0 only "
            "rank 0 scores questions"
        )

    terminal = _refuse
    prefixes = _refuse


def build_run_buffer(buffer_cfg: Any, wait_s: float = 600.0) -> ReplayBuffer:
    """``buffer.build_buffer`` with Redis autostart done by rank 0 only; other ranks wait for
    the server to answer (several processes starting redis-server at once would race)."""
    from omegaconf import OmegaConf

    from contraq.buffer import BufferUnavailableError, build_buffer

    cfg = (
        OmegaConf.to_container(buffer_cfg, resolve=True)
        if OmegaConf.is_config(buffer_cfg)
        else dict(buffer_cfg)
    )
    assert isinstance(cfg, dict)
    if cfg.get("backend") != "redis" or not cfg.get("autostart") or env_rank() == 0:
        return build_buffer(cfg)
    cfg["autostart"] = False
    deadline, last_note = time.monotonic() + wait_s, time.monotonic()
    while True:
        try:
            return build_buffer(cfg)
        except BufferUnavailableError:
            if time.monotonic() > deadline:
                raise
            if time.monotonic() - last_note > 15:
                log.info(
                    "rank %d: waiting for rank 0 to start Redis on port %s",
                    env_rank(),
                    cfg.get("port"),
                )
                last_note = time.monotonic()
            time.sleep(0.5)


@contextlib.contextmanager
def lightning_relaunch(trainer: L.Trainer) -> Iterator[None]:
    """Make Lightning's own process launch re-run ``contraq train``.

    Without torchrun, Lightning starts ranks 1..N-1 by re-running the command line; under
    Hydra it runs ``python -m <__main__'s module> argv[1:] hydra.run.dir=...``. ``contraq
    train`` rewrites argv to ``["contraq train", *overrides]`` for Hydra, which Lightning cannot
    re-run, so during ``fit`` the command line reads ``python -m contraq.cli train
    <overrides>``. Outside Hydra there is no command line to re-run: an error says so.
    """
    from lightning.pytorch.strategies.launchers.subprocess_script import (
        _SubprocessScriptLauncher,
    )

    strategy = trainer.strategy
    env = getattr(strategy, "cluster_environment", None)
    spawns = (
        trainer.world_size > 1
        and env is not None
        and not env.creates_processes_externally
        and isinstance(getattr(strategy, "launcher", None), _SubprocessScriptLauncher)
    )
    if not spawns:
        yield
        return
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise RuntimeError(
            "trainer=ddp with several devices needs a launcher: run `contraq train ...` "
            "(Lightning then starts the other ranks) or scripts/run_ddp.sh (torchrun)"
        )
    import __main__

    old_argv, old_spec = list(sys.argv), getattr(__main__, "__spec__", None)
    sys.argv = [old_argv[0], "train", *old_argv[1:]]
    __main__.__spec__ = importlib.util.find_spec("contraq.cli")
    try:
        yield
    finally:
        sys.argv = old_argv
        __main__.__spec__ = old_spec


# --------------------------------------------------------------------------------------------
# Rank 0 samples, every rank gets its slice
# --------------------------------------------------------------------------------------------


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


def step_batch(module: GFlowNetModule, step: int) -> dict[str, Any]:
    """This rank's training data for ``step`` under ``module.cfg.sampling``.

    ``per_rank`` (or no process group): ``module.get_batch(step)``. ``rank0`` /
    ``rank0_broadcast``: rank 0 runs ``get_batch`` for every rank's slice (or only its own),
    then two small broadcasts (int64 header ``[4 + world]``: P, T, has_prefix, replay, rows per
    rank; float64 exploration temperature) and two scatters (:func:`pack_rows` tensors, padded
    to the largest slice) hand each rank its rows. The returned dict
    has ``get_batch``'s keys for this rank's slice (``reward_out``: rank 0's slice on rank 0,
    None elsewhere) plus ``global_batch``: everything rank 0 drew (rank 0), else None.
    """
    mode = check_sampling(module.cfg.sampling)
    if mode == "per_rank" or not dist_ready():
        data = module.get_batch(step)
        data.setdefault("global_batch", None)
        return data
    world, rank = dist.get_world_size(), dist.get_rank()
    dev = comm_device(module.device)
    header = torch.zeros(_HEADER_FIXED + world, dtype=torch.long, device=dev)
    temp = torch.full((1,), float("nan"), dtype=torch.float64, device=dev)
    scatter_l: list[Tensor] | None = None
    scatter_f: list[Tensor] | None = None
    data: dict[str, Any] | None = None
    if rank == 0:
        data = module.get_batch(step, list(range(world)) if mode == "rank0" else [0])
        bounds = data["slices"] if mode == "rank0" else data["slices"] * world
        longs, floats = pack_rows(
            data["batch"], data["log_r"], data["prefix_log_r"], data["fact_rows"]
        )
        counts = [b - a for a, b in bounds]
        width = max(counts)
        scatter_l = [_pad_rows(longs[a:b], width).to(dev) for a, b in bounds]
        scatter_f = [_pad_rows(floats[a:b], width).to(dev) for a, b in bounds]
        p, t = data["batch"].prompt_ids.shape[1], data["batch"].actions.shape[1]
        fixed = [p, t, int(data["prefix_log_r"] is not None), int(data["stats"].get("replay", 0.0))]
        header.copy_(torch.tensor(fixed + counts, dtype=torch.long))
        temp.fill_(float(data["stats"].get("pf_temperature", float("nan"))))
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
    batch = batch.to(module.device)
    stats: dict[str, float] = {"replay": float(replay)}
    if not replay:
        stats["pf_temperature"] = float(temp.item())
    reward_out = None
    if data is not None and data["reward_out"] is not None:
        reward_out = slice_reward_output(data["reward_out"], 0, n)
    return {
        "batch": batch,
        "facts": [module.facts[i] for i in fact_rows],
        "fact_rows": fact_rows,
        "log_r": log_r.to(module.device),
        "prefix_log_r": prefix.to(module.device) if prefix is not None else None,
        "reward_out": reward_out,
        "stats": {**(data["stats"] if data is not None else {}), **stats},
        "slices": [(0, n)],
        "global_batch": data["batch"] if data is not None else None,
    }


# --------------------------------------------------------------------------------------------
# Audit: what each rank holds and trains on (tests, benchmarks, debugging a desync)
# --------------------------------------------------------------------------------------------


def tensor_digest(tensors: Mapping[str, Tensor]) -> str:
    """blake2b over names and raw bytes, in name order: equal iff bit-identical."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous().reshape(-1)
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def row_digests(batch: SampleBatch) -> list[str]:
    """One digest per trajectory: its real prompt tokens and its actions up to termination."""
    out = []
    for b in range(len(batch)):
        prompt = batch.prompt_ids[b][batch.prompt_mask[b].bool()].tolist()
        actions = batch.actions[b, : int(batch.lengths[b])].tolist()
        out.append(
            hashlib.blake2b(json.dumps([prompt, actions]).encode(), digest_size=12).hexdigest()
        )
    return out


class DDPAudit(L.Callback):
    """Appends one JSON line per optimizer step to ``<out_dir>/rank<R>.jsonl``: the step, a
    digest of the trainable parameters after the step, the row digests this rank trained on
    and (rank 0, rank0 modes) those of everything it sampled. Enable with
    ``+ddp_audit_dir=PATH``; a ``start`` line records the parameters a (resumed) run begins
    with. Lines are flushed at once, so a killed run leaves complete lines."""

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.out_dir = Path(out_dir)

    def _write(self, trainer: L.Trainer, record: dict[str, Any]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with (self.out_dir / f"rank{trainer.global_rank}.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def _base(self, trainer: L.Trainer, pl_module: Any) -> dict[str, Any]:
        return {
            "step": trainer.global_step,
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "time": time.time(),
            "params": tensor_digest(pl_module.trainable_state_dict()),
        }

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._write(trainer, {"event": "start", **self._base(trainer, pl_module)})

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        data = pl_module.last_batch or {}
        batch = data.get("batch")
        glob = data.get("global_batch")
        self._write(
            trainer,
            {
                "event": "step",
                **self._base(trainer, pl_module),
                "replay": float(data.get("stats", {}).get("replay", 0.0)),
                "rows": row_digests(batch) if batch is not None else [],
                "global_rows": row_digests(glob) if glob is not None else None,
            },
        )


def extra_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """Callbacks this module adds to a run: the audit when ``ddp_audit_dir`` is set."""
    from omegaconf import OmegaConf

    path = OmegaConf.select(cfg, "ddp_audit_dir", default=None)
    return [DDPAudit(path)] if path else []
