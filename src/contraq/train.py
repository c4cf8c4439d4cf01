"""`contraq train`: build every part from the Hydra config and run Lightning.

The run folder (``output_dir``) holds everything a later command needs::

    config.yaml            the resolved config, passwords masked (what `sample`/`eval`/`report`
                           rebuild from); written once the new config has been validated
    checkpoints/last.ckpt  resume point (LoRA + log Z + optimizer + schedules + step + buffer),
                           written atomically (contraq.runs)
    adapter/               the LoRA adapter (peft format) + log_z_head.safetensors
    logs/metrics.csv       every logged number, of every launch (appended)
    samples.jsonl          questions sampled during training, with answers and reward parts
"""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from peft import PeftModel

from contraq import launch, runs
from contraq.callbacks import StopOnSignal, build_callbacks
from contraq.conf import LossConfig, SamplerOptions, TrainConfig, load_group
from contraq.config_check import ConfigError, check_relaunch, masked, validate
from contraq.data import (
    EditFact,
    FactSplit,
    encode_prompts,
    load_split,
    question_prompt,
)
from contraq.errors import TrainingInterrupted
from contraq.files import resolve_path
from contraq.judge.scorer import load_scorer
from contraq.models import ModelConfig, attach_lora, load_model_and_tokenizer, termination_token_id
from contraq.module import GFlowNetModule
from contraq.reward.build import build_reward
from contraq.sampler import SamplerConfig, default_banned_token_ids

log = logging.getLogger(__name__)


def model_config(cfg: DictConfig) -> ModelConfig:
    return load_group(cfg, "model", ModelConfig)


def sampler_config(cfg: DictConfig, tokenizer: Any, term_id: int) -> SamplerConfig:
    """Sampler settings; banned: special tokens, every token containing a newline, and extras."""
    s = load_group(cfg, "sampler", SamplerOptions)
    banned = set(default_banned_token_ids(tokenizer, term_id))
    for text in s.extra_banned_tokens:
        banned.update(tokenizer.encode(text, add_special_tokens=False))
    banned.discard(term_id)
    return SamplerConfig(
        min_len=s.min_len,
        max_len=s.max_len,
        termination_token_id=term_id,
        top_k=s.top_k or None,
        top_p=s.top_p if s.top_p < 1.0 else None,
        banned_token_ids=sorted(banned),
        ban_penalty=s.ban_penalty,
        pad_token_id=int(tokenizer.pad_token_id),
    )


def use_chat(cfg: DictConfig, tokenizer: Any) -> bool:
    flag = cfg.prompt.use_chat_template
    if flag == "auto":
        return bool(getattr(tokenizer, "chat_template", None))
    return bool(flag)


def build_prompts(cfg: DictConfig, facts: Sequence[EditFact], tokenizer: Any) -> list[list[int]]:
    """Prompt token ids (unpadded) for each fact."""
    if not facts:
        return []
    chat = use_chat(cfg, tokenizer)
    template = cfg.prompt.template if chat else cfg.prompt.raw_template
    texts = [question_prompt(f, template, tokenizer, chat) for f in facts]
    ids, mask = encode_prompts(texts, tokenizer)
    return [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]


class Parts:
    """Everything a command builds from a run config: model, tokenizer, reward, facts."""

    def __init__(
        self, cfg: DictConfig, *, with_lora: bool = True, adapter_dir: Path | None = None
    ) -> None:
        self.cfg = cfg
        mcfg = model_config(cfg)
        model, tokenizer = load_model_and_tokenizer(mcfg)
        if adapter_dir is not None:
            model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
        elif with_lora:
            model = attach_lora(model, mcfg)
        self.policy = model
        self.tokenizer = tokenizer
        try:
            self.term_id = termination_token_id(tokenizer, mcfg.termination_token)
        except ValueError as e:
            raise ConfigError("model.termination_token", str(e)) from None
        self.sampler_cfg = sampler_config(cfg, tokenizer, self.term_id)
        self._reward = None

    def reward(self) -> Any:
        if self._reward is None:
            nli = None
            if self.cfg.reward.name == "contradiction":
                device = next(self.policy.parameters()).device
                nli = load_scorer(self.cfg.nli, device=device)
            self._reward = build_reward(
                self.cfg.reward, self.policy, self.tokenizer, self.term_id, nli=nli
            )
        return self._reward


def run_split(cfg: DictConfig) -> FactSplit:
    """The run's facts split by subject; a split that leaves no training fact is a
    ConfigError, an empty validation split only skips the `val/` metrics."""
    path = cfg.data.path
    split = load_split(cfg.data)
    if not split.train:
        n_facts = len(split.val) + len(split.test)
        raise ConfigError(
            "data.val_fraction",
            f"the split of {path} leaves no training fact ({n_facts} facts); lower "
            "data.val_fraction / data.test_fraction or use more subjects",
        )
    if not split.val and int(cfg.eval.n_facts) > 0:
        log.warning(
            "the validation split of %s is empty (data.val_fraction=%s): no val/ metrics; "
            "raise data.val_fraction, or set eval.n_facts=0 to silence this",
            path,
            cfg.data.val_fraction,
        )
    log.info(
        "facts: %d train, %d val, %d test (held out)",
        len(split.train),
        len(split.val),
        len(split.test),
    )
    return split


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
        plugins=[runs.AtomicCheckpointIO()],
        default_root_dir=str(out_dir),
        enable_progress_bar=str(cfg.callbacks.progress_bar) != "none",
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
    ckpt_dir = out_dir / "checkpoints"
    saved = masked(OmegaConf.to_container(cfg, resolve=True))
    check_relaunch(out_dir, saved, cfg.resume)
    ckpt_path = runs.find_resume_checkpoint(cfg.resume, ckpt_dir, resolve_path)
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
    callbacks = build_callbacks(cfg, out_dir)
    trainer = build_trainer(cfg, out_dir, callbacks)
    if launch.env_rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        runs.write_run_config(out_dir, OmegaConf.to_yaml(saved), cfg.resume == "never")
        runs.remove_stale_temp_files(ckpt_dir)
    started = time.time()
    with launch.lightning_relaunch(trainer):
        trainer.fit(module, train_dataloaders=step_loader(), ckpt_path=ckpt_path)
    stop = next(c for c in callbacks if isinstance(c, StopOnSignal))
    if trainer.is_global_zero:
        meta = {
            "steps": trainer.global_step,
            "seconds": time.time() - started,
            "resumed_from": ckpt_path,
            "stopped_by": signal.Signals(stop.stopped_by).name if stop.stopped_by else None,
        }
        (out_dir / "train_summary.json").write_text(json.dumps(meta, indent=2))
    if stop.stopped_by is not None:
        raise TrainingInterrupted(stop.stopped_by, trainer.global_step, ckpt_dir / "last.ckpt")
    return out_dir


def step_loader() -> torch.utils.data.DataLoader:
    """An endless stream of step placeholders: the module picks facts from the step counter."""

    class Steps(torch.utils.data.IterableDataset):
        def __iter__(self):  # type: ignore[override]
            i = 0
            while True:
                yield i
                i += 1

    return torch.utils.data.DataLoader(Steps(), batch_size=None)
