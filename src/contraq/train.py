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

from contraq import distributed, runs
from contraq.config_check import ConfigError, check_relaunch, masked, validate
from contraq.data import (
    DEFAULT_MAX_CHARS,
    EditFact,
    encode_prompts,
    load_facts,
    question_prompt,
    split_facts,
)
from contraq.errors import TrainingInterrupted
from contraq.files import resolve_path
from contraq.judge.scorer import load_scorer
from contraq.models import ModelConfig, attach_lora, load_model_and_tokenizer, termination_token_id
from contraq.module import GFlowNetModule, TrainConfig, save_adapter
from contraq.reward import build_reward
from contraq.sampler import SamplerConfig, default_banned_token_ids

log = logging.getLogger(__name__)


def model_config(cfg: DictConfig) -> ModelConfig:
    return ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True))  # type: ignore[arg-type]


def sampler_config(cfg: DictConfig, tokenizer: Any, term_id: int) -> SamplerConfig:
    """Sampler settings; banned: special tokens, every token containing a newline, and extras."""
    s = cfg.sampler
    banned = set(default_banned_token_ids(tokenizer, term_id))
    for text in s.get("extra_banned_tokens", []) or []:
        banned.update(tokenizer.encode(text, add_special_tokens=False))
    banned.discard(term_id)
    return SamplerConfig(
        min_len=int(s.min_len),
        max_len=int(s.max_len),
        termination_token_id=term_id,
        top_k=int(s.top_k) or None,
        top_p=float(s.top_p) if float(s.top_p) < 1.0 else None,
        banned_token_ids=sorted(banned),
        ban_penalty=float(s.ban_penalty),
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


def train_config(cfg: DictConfig) -> TrainConfig:
    t, r, b, lo = cfg.train, cfg.reward, cfg.buffer, cfg.loss
    return TrainConfig(
        facts_per_step=int(t.facts_per_step),
        n_samples=int(t.n_samples),
        lr=float(t.lr),
        logz_lr=float(t.logz_lr),
        weight_decay=float(t.weight_decay),
        lr_warmup_steps=int(t.lr_warmup_steps),
        pf_temp_prob=float(t.pf_temp_prob),
        pf_temp_low=float(t.pf_temp_low),
        pf_temp_high=float(t.pf_temp_high),
        loss=str(lo.name),
        subtb_lambda=float(lo.get("subtb_lambda", 1.0)),
        use_buffer_prob=float(b.use_buffer_prob),
        buffer_prioritized=bool(b.prioritized),
        reward_temp_start=float(r.reward_temp_start),
        reward_temp_end=float(r.reward_temp_end),
        reward_temp_horizon=int(r.reward_temp_horizon),
        seed=int(cfg.seed),
        sampling=str(t.sampling),
    )


class Parts:
    """Everything a command builds from a run config: model, tokenizer, reward, facts."""

    def __init__(
        self, cfg: DictConfig, *, with_lora: bool = True, adapter_dir: Path | None = None
    ) -> None:
        self.cfg = cfg
        mcfg = model_config(cfg)
        model, tokenizer = load_model_and_tokenizer(mcfg)
        if adapter_dir is not None:
            from peft import PeftModel

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


class AdapterCheckpoint(L.Callback):
    """Saves the LoRA adapter next to every last.ckpt, so `contraq sample` needs no Lightning."""

    def __init__(self, out_dir: Path, every_n_steps: int) -> None:
        self.out_dir, self.every = out_dir, max(1, every_n_steps)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        if trainer.is_global_zero and trainer.global_step % self.every == 0:
            save_adapter(pl_module, self.out_dir)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.is_global_zero:
            save_adapter(pl_module, self.out_dir)


class SampleWriter(L.Callback):
    """Appends the step's questions, answers and reward parts to samples.jsonl (rank 0 only)."""

    def __init__(self, path: Path, every_n_steps: int) -> None:
        self.path, self.every = path, max(1, every_n_steps)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        data = pl_module.last_batch
        if not trainer.is_global_zero or data is None or data["reward_out"] is None:
            return
        if trainer.global_step % self.every != 0:
            return
        out = data["reward_out"]
        with self.path.open("a") as f:
            for b, fact in enumerate(data["facts"]):
                row = {
                    "step": trainer.global_step,
                    "subject": fact.subject,
                    "edit_fact": fact.edit_fact,
                    "question": out.questions[b],
                    "answer": out.answers[b] if out.answers else None,
                    "log_r": float(out.log_r[b]),
                }
                for k, v in out.components.items():
                    if torch.is_tensor(v) and v.dim() == 1:
                        row[k] = float(v[b])
                f.write(json.dumps(row) + "\n")


class FreshSampleEval(L.Callback):
    """Logs `val/` metrics of on-policy samples for held-back facts at the start, every N steps
    and at the end, and appends them to fresh_eval.jsonl (the run's start-vs-end record)."""

    def __init__(
        self, path: Path, every_n_steps: int, n_samples: int, diversity: bool = True
    ) -> None:
        self.path, self.every, self.n = path, max(1, every_n_steps), n_samples
        self.diversity = diversity
        self._embedder = None
        self._last_step = -1

    def _run(self, trainer: L.Trainer, pl_module: Any) -> None:
        step = trainer.global_step
        if step == self._last_step or not trainer.is_global_zero:
            return
        self._last_step = step
        if self.diversity and self._embedder is None:
            from contraq.metrics import Embedder

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


def build_progress_bar(kind: str) -> list[L.Callback]:
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    if kind == "rich":
        return [RichProgressBar(leave=True)]
    if kind == "tqdm":
        return [TQDMProgressBar()]
    return []


def load_split(cfg: DictConfig) -> Any:
    """The run's facts split by subject; a split that leaves no training fact is a
    ConfigError, an empty validation split only skips the `val/` metrics."""
    path = resolve_path(cfg.data.path)
    facts = load_facts(path, max_chars=int(cfg.data.get("max_fact_chars", DEFAULT_MAX_CHARS)))
    split = split_facts(
        facts,
        val_fraction=float(cfg.data.val_fraction),
        test_fraction=float(cfg.data.test_fraction),
        seed=int(cfg.data.split_seed),
    )
    if not split.train:
        raise ConfigError(
            "data.val_fraction",
            f"the split of {path} leaves no training fact ({len(facts)} facts); lower "
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


def build_callbacks(cfg: DictConfig, out_dir: Path) -> list[L.Callback]:
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    cb = cfg.callbacks
    return [
        ModelCheckpoint(
            dirpath=str(out_dir / "checkpoints"),
            filename="step={step}",
            auto_insert_metric_name=False,
            every_n_train_steps=int(cb.checkpoint_every_n_steps),
            save_last=True,
            save_top_k=int(cb.keep_step_checkpoints),
            monitor="step",
            mode="max",
        ),
        AdapterCheckpoint(out_dir / "adapter", int(cb.checkpoint_every_n_steps)),
        SampleWriter(out_dir / "samples.jsonl", int(cb.samples_every_n_steps)),
        FreshSampleEval(
            out_dir / "fresh_eval.jsonl",
            int(cfg.eval.every_n_steps),
            int(cfg.eval.n_samples),
            diversity=bool(cfg.eval.get("diversity", True)),
        ),
        LearningRateMonitor(logging_interval="step"),
        runs.StopOnSignal(out_dir / "checkpoints"),
        *build_progress_bar(str(cb.progress_bar)),
        *distributed.extra_callbacks(cfg),
    ]


def build_trainer(cfg: DictConfig, out_dir: Path, callbacks: list[L.Callback]) -> L.Trainer:
    loggers = [instantiate(v) for v in cfg.logger.values()] if cfg.logger else False
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(trainer_kwargs, dict)
    trainer_kwargs = distributed.trainer_kwargs_from_env(trainer_kwargs)
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
    distributed.prepare(cfg)
    ckpt_dir = out_dir / "checkpoints"
    saved = masked(OmegaConf.to_container(cfg, resolve=True))
    check_relaunch(out_dir, saved, cfg.resume)
    ckpt_path = runs.find_resume_checkpoint(cfg.resume, ckpt_dir, resolve_path)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    split = load_split(cfg)
    parts = Parts(cfg)
    # train.sampling=rank0: only rank 0 scores, the others never load the reward models.
    reward = parts.reward() if distributed.rank_scores(cfg) else distributed.RankZeroReward()
    buffer = distributed.build_run_buffer(cfg.buffer)  # Redis autostart by rank 0 only
    eval_facts = split.val[: int(cfg.eval.n_facts)]
    module = GFlowNetModule(
        policy=parts.policy,
        tokenizer=parts.tokenizer,
        facts=split.train,
        prompts=build_prompts(cfg, split.train, parts.tokenizer),
        reward=reward,
        buffer=buffer,
        sampler_cfg=parts.sampler_cfg,
        cfg=train_config(cfg),
        eval_facts=eval_facts,
        eval_prompts=build_prompts(cfg, eval_facts, parts.tokenizer),
    )
    callbacks = build_callbacks(cfg, out_dir)
    trainer = build_trainer(cfg, out_dir, callbacks)
    if distributed.env_rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        runs.write_run_config(out_dir, OmegaConf.to_yaml(saved), cfg.resume == "never")
        runs.remove_stale_temp_files(ckpt_dir)
    started = time.time()
    with distributed.lightning_relaunch(trainer):
        trainer.fit(module, train_dataloaders=step_loader(), ckpt_path=ckpt_path)
    stop = next(c for c in callbacks if isinstance(c, runs.StopOnSignal))
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
