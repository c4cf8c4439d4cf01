"""`contraq train`: build every part from the Hydra config and run Lightning.

The run folder (``output_dir``) holds everything a later command needs::

    config.yaml            the resolved config, passwords masked (what `sample`/`eval`/`report`
                           rebuild from); written once the new config has been validated
    checkpoints/last.ckpt  resume point (LoRA + log Z + optimizer + schedules + step + buffer),
                           written atomically (contraq.run.folder)
    adapter/               the LoRA adapter (peft format) + log_z_head.safetensors
    logs/metrics.csv       every logged number, of every launch (appended)
    samples.jsonl          questions sampled during training, with answers and reward parts
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig, OmegaConf

from contraq.config.checks import check_relaunch, masked, validate
from contraq.config.schema import LossConfig, TrainConfig, load_group, run_defaults
from contraq.errors import TrainingAborted, TrainingInterrupted
from contraq.files import resolve_path
from contraq.lm.models import weights_dtype
from contraq.run import folder, hydra_record
from contraq.run.parts import Parts, build_prompts, run_split
from contraq.training import launch
from contraq.training.callbacks import StopOnSignal, build_callbacks
from contraq.training.module import GFlowNetModule
from contraq.training.step import StepPlans

log = logging.getLogger(__name__)


def build_trainer(cfg: DictConfig, out_dir: Path, callbacks: list[L.Callback]) -> L.Trainer:
    loggers = [instantiate(v) for v in cfg.logger.values()] if cfg.logger else False
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(trainer_kwargs, dict)
    trainer_kwargs = launch.trainer_kwargs_from_env(trainer_kwargs)
    strategy = trainer_kwargs.pop("strategy", "auto")
    if isinstance(strategy, dict):
        strategy = instantiate(strategy)
    return L.Trainer(
        **trainer_kwargs,
        strategy=strategy,
        logger=loggers,
        callbacks=callbacks,
        plugins=[folder.AtomicCheckpointIO()],
        default_root_dir=str(out_dir),
        # else Lightning adds its own bar when callbacks.progress_bar was dropped
        enable_progress_bar=any(isinstance(c, ProgressBar) for c in callbacks),
    )


def run_training(cfg: DictConfig) -> Path:
    """Train as configured; returns the run folder.

    Order matters for the run folder: the config is validated and every part built (facts,
    model, termination token, buffer) before ``config.yaml`` is written, so a relaunch that
    fails leaves the run as it was; a relaunch whose config differs is refused.
    """
    validate(cfg)
    out_dir = Path(cfg.output_dir).resolve()
    launch.prepare(cfg)
    # One training process per folder (rank 0 holds it; DDP's other ranks are its children).
    lock = folder.training_lock(out_dir) if launch.env_rank() == 0 else contextlib.nullcontext()
    with lock:
        return _fit(cfg, out_dir)


def _fit(cfg: DictConfig, out_dir: Path) -> Path:
    """:func:`run_training` once the config is valid and the folder is this process's."""
    ckpt_dir = out_dir / "checkpoints"
    saved = masked(OmegaConf.to_container(cfg, resolve=True))
    saved.pop("evaluation", None)  # the demo's eval settings are not part of the run
    check_relaunch(out_dir, saved, cfg.resume, defaults=run_defaults())
    ckpt_path = folder.find_resume_checkpoint(cfg.resume, ckpt_dir, resolve_path)
    callbacks = build_callbacks(cfg)  # a node that cannot be built fails before any loading
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    split = run_split(cfg)
    parts = Parts(cfg)
    # train.sampling=rank0: only rank 0 scores, the others never load the reward models.
    reward = parts.reward() if launch.rank_scores(cfg) else launch.RankZeroReward()
    buffer = launch.build_run_buffer(cfg.buffer)  # Redis autostart by rank 0 only
    eval_facts = split.val[: int(cfg.eval.n_facts)]
    module = GFlowNetModule(
        policy=parts.policy,
        tokenizer=parts.tokenizer,
        facts=split.train,
        prompts=build_prompts(cfg, split.train, parts.tokenizer),
        reward=reward,
        buffer=buffer,
        sampler_cfg=parts.sampler_cfg,
        cfg=load_group(cfg, "train", TrainConfig),
        loss_cfg=load_group(cfg, "loss", LossConfig),
        seed=int(cfg.seed),
        eval_facts=eval_facts,
        eval_prompts=build_prompts(cfg, eval_facts, parts.tokenizer),
    )
    trainer = build_trainer(cfg, out_dir, callbacks)
    if launch.env_rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        folder.write_run_config(out_dir, OmegaConf.to_yaml(saved), cfg.resume == "never")
        hydra_record.write(cfg)  # .hydra/: Hydra's record, now that the config is accepted
        if cfg.resume == "never":
            folder.set_aside_checkpoints(ckpt_dir)
        folder.remove_stale_temp_files(ckpt_dir)
    started = time.time()
    stop = next(c for c in callbacks if isinstance(c, StopOnSignal))
    try:
        with launch.shared_cpu_threads(trainer), launch.lightning_relaunch(trainer):
            trainer.fit(module, train_dataloaders=step_loader(module), ckpt_path=ckpt_path)
    except SystemExit:  # Lightning exits 1 on the KeyboardInterrupt of a second signal
        if stop.received is None:
            raise
        raise TrainingAborted(stop.received, ckpt_dir / "last.ckpt") from None
    if trainer.is_global_zero:
        meta = {
            "steps": trainer.global_step,
            "seconds": time.time() - started,
            # model.dtype=auto as this machine resolved it (contraq.lm.models.auto_dtype).
            "dtype": weights_dtype(parts.policy),
            "resumed_from": ckpt_path,
            "stopped_by": signal.Signals(stop.stopped_by).name if stop.stopped_by else None,
        }
        (out_dir / "train_summary.json").write_text(json.dumps(meta, indent=2))
    if stop.stopped_by is not None:
        raise TrainingInterrupted(stop.stopped_by, trainer.global_step, ckpt_dir / "last.ckpt")
    return out_dir


def step_loader(module: GFlowNetModule) -> torch.utils.data.DataLoader:
    """An endless stream of :class:`~contraq.training.step.StepPlan`: the step index, its replay
    coin and every rank's sampled facts, from the module's step counter on (see StepPlans)."""
    return torch.utils.data.DataLoader(StepPlans(module.plan, module.first_step), batch_size=None)
