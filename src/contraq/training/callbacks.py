"""The run's Lightning callbacks: :func:`build_callbacks` instantiates the ``callbacks`` group
(``configs/callbacks/``: one ``_target_`` node per callback, Lightning's and these):

- :class:`AdapterCheckpoint`: the LoRA adapter after every ``last.ckpt``, each written only
  when the disk has room for both;
- :class:`SampleWriter`: the step's questions, answers and reward parts to ``samples.jsonl``;
- :class:`FreshSampleEval`: on-policy ``val/`` metrics to the loggers and ``fresh_eval.jsonl``;
- :class:`StopOnSignal`: SIGINT/SIGTERM finish the step, save ``last.ckpt`` and stop;
- :class:`StepTimer`: each step's wall seconds as ``train/step_seconds``;
- :class:`DDPAudit`: per-rank digests of weights and trained rows (``+ddp_audit_dir=PATH``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from contraq.config.checks import ConfigError
from contraq.errors import UserError
from contraq.evaluation.metrics import Embedder
from contraq.files import write_dir_atomically
from contraq.lm.sampling import SampleBatch
from contraq.training.module import save_adapter
from contraq.training.step import StepBatch

log = logging.getLogger(__name__)


def step_batch(outputs: Any) -> StepBatch | None:
    """The step batch a training step returned (``outputs["step_batch"]``), if any."""
    sb = outputs.get("step_batch") if isinstance(outputs, Mapping) else None
    return sb if isinstance(sb, StepBatch) else None


class DiskSpaceError(UserError):
    """Too little free space to write a checkpoint (and the adapter with it)."""


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested dict/list/tuple: what ``torch.save`` writes, give or
    take the pickled structure."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def bytes_needed(state: int, previous: int, adapter: int, margin: int) -> int:
    """Free bytes a checkpoint write needs: the larger of its tensors' bytes and the previous
    checkpoint's size (the buffer and pickled parts grow), the adapter written after it, and
    the margin (the old files stay until the new ones are complete)."""
    return max(state, previous) + adapter + margin


def check_free_space(folder: Path, needed: int, free: int) -> None:
    """Refuse the write when ``free`` bytes in ``folder`` fall short of ``needed``.

    Raises:
        DiskSpaceError: naming the folder and both numbers.
    """
    if free < needed:
        raise DiskSpaceError(
            f"{folder}: {needed} bytes needed for the next checkpoint and adapter, {free} free; "
            "the last checkpoint and adapter/ were kept as they were (free some space, or "
            "lower callbacks.adapter_checkpoint.free_margin_mb, and relaunch to resume)"
        )


def folder_bytes(folder: Path) -> int:
    """Total size of the files directly in ``folder`` (0 when absent)."""
    return sum(p.stat().st_size for p in folder.glob("*") if p.is_file())


def _ckpt_dir(trainer: L.Trainer) -> Path:
    """The folder of ``last.ckpt`` (``callbacks.model_checkpoint.dirpath``)."""
    model_checkpoint = next(c for c in trainer.callbacks if isinstance(c, ModelCheckpoint))
    return Path(str(model_checkpoint.dirpath))


class AdapterCheckpoint(Checkpoint):
    """Saves the LoRA adapter after each ``last.ckpt`` of its steps, so `contraq sample` needs
    no Lightning; never ahead of ``last.ckpt`` (the run may resume from it).

    A :class:`Checkpoint`: Lightning runs it after ``ModelCheckpoint`` (``build_callbacks``
    orders them), so a checkpoint write that fails leaves the adapter of the previous one.
    Before every checkpoint write (``on_save_checkpoint``, also the stop on a signal) the
    target's free space is checked against the checkpoint's and the adapter's size plus
    ``free_margin_mb``: a full disk stops the run in one line with both intact.
    """

    def __init__(
        self, out_dir: str | os.PathLike[str], every_n_steps: int, free_margin_mb: float = 64
    ) -> None:
        self.out_dir, self.every = Path(out_dir), max(1, every_n_steps)
        self.margin = int(free_margin_mb * 2**20)
        self.saved_step = -1  # the step of the last checkpoint written (on every rank)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: Any, checkpoint: dict[str, Any]
    ) -> None:
        folder = _ckpt_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        last = folder / "last.ckpt"
        trainable = sum(
            p.numel() * p.element_size() for p in pl_module.parameters() if p.requires_grad
        )
        needed = bytes_needed(
            tensor_bytes(checkpoint),
            last.stat().st_size if last.is_file() else 0,
            max(folder_bytes(self.out_dir), trainable),
            self.margin,
        )
        check_free_space(folder, needed, shutil.disk_usage(folder).free)
        self.saved_step = trainer.global_step

    def _save(self, pl_module: Any) -> None:
        """The adapter folder replaced whole: a failed write leaves the previous one."""
        write_dir_atomically(
            self.out_dir, lambda tmp: save_adapter(pl_module, tmp), lambda _: False, replace=True
        )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        step = trainer.global_step
        if trainer.is_global_zero and step % self.every == 0 and step == self.saved_step:
            self._save(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self.saved_step != trainer.global_step:  # last.ckpt first (collective under DDP)
            trainer.save_checkpoint(str(_ckpt_dir(trainer) / "last.ckpt"))
        if trainer.is_global_zero:
            self._save(pl_module)


class SampleWriter(L.Callback):
    """Appends the step's questions, answers and reward parts to samples.jsonl (rank 0 only)."""

    def __init__(self, path: str | os.PathLike[str], every_n_steps: int) -> None:
        self.path, self.every = Path(path), max(1, every_n_steps)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        sb = step_batch(outputs)
        if not trainer.is_global_zero or sb is None or sb.reward_out is None:
            return
        if trainer.global_step % self.every != 0:
            return
        out = sb.reward_out
        with self.path.open("a") as f:
            for b, fact in enumerate(sb.facts):
                row = {
                    "step": trainer.global_step,
                    "subject": fact.subject,
                    "edit_fact": fact.edit_fact,
                    "question": out.questions[b],
                    "answer": out.answers[b] if out.answers else None,
                    "log_r": float(out.log_r[b]),
                    **out.row_components(b),
                }
                f.write(json.dumps(row) + "\n")


class FreshSampleEval(L.Callback):
    """Logs `val/` metrics of on-policy samples for held-back facts at the start, every N steps
    and at the end, and appends them to fresh_eval.jsonl (the run's start-vs-end record)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        every_n_steps: int,
        n_samples: int,
        diversity: bool = True,
    ) -> None:
        self.path, self.every, self.n = Path(path), max(1, every_n_steps), n_samples
        self.diversity = diversity
        self._embedder = None
        self._last_step = -1

    def _run(self, trainer: L.Trainer, pl_module: Any) -> None:
        step = trainer.global_step
        if step == self._last_step or not trainer.is_global_zero:
            return
        self._last_step = step
        if self.diversity and self._embedder is None:
            self._embedder = Embedder(device=pl_module.device)
        metrics = pl_module.evaluate_fresh(self.n, self._embedder)
        if not metrics:
            return
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=step)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        log.info("fresh samples at step %d: %s", step, {k: round(v, 3) for k, v in metrics.items()})

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.global_step == 0:
            self._run(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        if trainer.global_step % self.every == 0:
            self._run(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._run(trainer, pl_module)


class StepTimer(L.Callback):
    """Logs each training step's wall seconds (sampling or replay, reward, loss, backward and
    the optimizer step) as ``train/step_seconds``: with ``train/replay`` beside it, where a
    run's time goes without a profiler."""

    def __init__(self) -> None:
        self.start = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        seconds = time.perf_counter() - self.start
        pl_module.log("train/step_seconds", seconds, on_step=True, on_epoch=False)


class StopOnSignal(L.Callback):
    """SIGINT/SIGTERM: finish the running step, save ``last.ckpt``, stop the fit cleanly.

    A second signal aborts at once (the previous handler runs). Under DDP the stop flag is
    reduced over ranks at every step, so all ranks stop at the same step.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, ckpt_dir: str | os.PathLike[str]) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.received: int | None = None  # the signal this process got
        self.stopped_by: int | None = None  # set on every rank once any rank got one
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:  # second signal: give up on the clean stop
            self._restore()
            previous = signal.getsignal(signum)
            if callable(previous):
                previous(signum, frame)
            raise KeyboardInterrupt
        self.received = signum
        log.warning(
            "%s: finishing this step, then saving %s (send it again to abort)",
            signal.Signals(signum).name,
            self.ckpt_dir / "last.ckpt",
        )

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        with contextlib.suppress(ValueError):  # ValueError: not the main thread
            for sig in self.SIGNALS:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        stop = trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)
        if stop:
            trainer.should_stop = True
            # Ranks that got no signal themselves (only one was signalled) report SIGTERM.
            self.stopped_by = self.received or signal.SIGTERM

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._restore()
        if self.stopped_by is not None:  # on every rank: saving is collective under DDP
            path = self.ckpt_dir / "last.ckpt"
            trainer.save_checkpoint(str(path))
            log.warning("stopped at step %d; saved %s", trainer.global_step, path)

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        self._restore()


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

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        sb = step_batch(outputs)
        glob = sb.global_batch if sb is not None else None
        self._write(
            trainer,
            {
                "event": "step",
                **self._base(trainer, pl_module),
                "replay": float(sb.replay) if sb is not None else 0.0,
                "rows": row_digests(sb.batch) if sb is not None else [],
                "global_rows": row_digests(glob) if glob is not None else None,
            },
        )


# The callbacks that keep a run folder resumable: config_check refuses a config without these
# names, and here each must build its class (not another _target_).
REQUIRED = {
    "model_checkpoint": ModelCheckpoint,
    "adapter_checkpoint": AdapterCheckpoint,
    "stop_on_signal": StopOnSignal,
}


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """Every node of the ``callbacks`` group, instantiated, plus :class:`DDPAudit` when
    ``ddp_audit_dir`` is set. A node that cannot be built raises a ``ConfigError`` naming it."""
    out: list[L.Callback] = []
    for name, node in cfg.callbacks.items():
        key = f"callbacks.{name}"
        try:
            callback = instantiate(node)
        except Exception as e:  # Hydra wraps import and argument errors alike
            cause = e.__cause__ or e
            first = (str(cause).splitlines() or [type(cause).__name__])[0]
            raise ConfigError(key, f"cannot build {node.get('_target_')!r}: {first}") from None
        want = REQUIRED.get(str(name), L.Callback)
        if not isinstance(callback, want):
            got = type(callback).__name__
            raise ConfigError(key, f"must build a {want.__name__}, got a {got}")
        out.append(callback)
    # Lightning runs Checkpoint callbacks last, in list order: the adapter after last.ckpt.
    out.sort(key=lambda c: isinstance(c, AdapterCheckpoint))
    audit_dir = OmegaConf.select(cfg, "ddp_audit_dir", default=None)
    return [*out, *([DDPAudit(audit_dir)] if audit_dir else [])]
