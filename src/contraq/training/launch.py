"""Starting a run on one or several processes: ranks before ``torch.distributed`` is up, the
launcher's settings, who loads the reward models and the Redis buffer, and Lightning's relaunch
of ``contraq train`` (called by :func:`contraq.training.train.run_training`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from contraq.buffer import BufferUnavailableError, ReplayBuffer, build_buffer
from contraq.procs import die_with_parent
from contraq.threads import torch_threads, usable_cores
from contraq.training.distributed import check_sampling

log = logging.getLogger(__name__)


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
def shared_cpu_threads(trainer: L.Trainer) -> Iterator[None]:
    """Several CPU ranks on one machine and no ``OMP_NUM_THREADS``: each rank gets
    ``cores // ranks`` torch threads during ``fit`` (the ranks that Lightning starts inherit
    the variable). Without it every rank takes every core, and the oversubscribed ranks are
    slower together than one. The old thread count comes back afterwards (``contraq demo``
    evaluates in this process)."""
    from lightning.pytorch.accelerators import CPUAccelerator

    ranks = int(trainer.num_devices)
    if (
        "OMP_NUM_THREADS" in os.environ
        or ranks <= 1
        or not isinstance(trainer.accelerator, CPUAccelerator)
    ):
        yield
        return
    n = max(1, usable_cores() // ranks)
    os.environ["OMP_NUM_THREADS"] = str(n)
    try:
        with torch_threads(n):
            yield
    finally:
        del os.environ["OMP_NUM_THREADS"]


def train_overrides(overrides: list[str]) -> list[str]:
    """The overrides that ``contraq train`` understands: ``contraq demo``'s own group
    (``evaluation``, read after training by rank 0 only) left out, so that the ranks Lightning
    re-launches as ``contraq train`` accept the demo's command line."""

    def key(o: str) -> str:
        return o.lstrip("+~").split("=", 1)[0]

    return [o for o in overrides if key(o).split(".", 1)[0] != "evaluation"]


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
    sys.argv = [old_argv[0], "train", *train_overrides(old_argv[1:])]
    __main__.__spec__ = importlib.util.find_spec("contraq.cli")
    try:
        yield
    finally:
        sys.argv = old_argv
        __main__.__spec__ = old_spec
