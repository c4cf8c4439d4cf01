"""`contraq smooth run=RUN out=DIR`: maximum likelihood on a trained run's best questions.

The second stage of GFlowNet red-teaming (Lee et al., 2024): the GFlowNet's replay buffer holds
the high-reward questions it found over the whole run, across many training facts. A fresh LoRA
on the base LM is fitted by maximum likelihood to the counted contradictions among them (one
copy of each question per fact after text normalisation), which keeps the modes the GFlowNet
found without its late collapse onto one greedy question per fact.

The result is a run folder (``config.yaml`` + ``adapter/``) that `contraq eval` and
`contraq sample` take like any trained run; ``smooth.json`` records what was kept.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from contraq.config.checks import ConfigError
from contraq.errors import UserError
from contraq.genuine import normalize_text

log = logging.getLogger(__name__)


class SmoothError(UserError, ValueError):
    """The run cannot be smoothed (no buffer, no counted question); the message says why."""


@dataclass(frozen=True)
class SmoothConfig:
    """The settings of `contraq smooth` (``configs/smooth.yaml`` has their defaults).

    ``min_contradiction``: the judged contradiction probability a kept question's answer needs
    (entries must also be counted: a question whose answer is no echo). ``max_per_fact``: the
    highest-reward distinct questions kept per training fact.
    """

    run: str
    out: str
    min_contradiction: float
    max_per_fact: int
    epochs: int
    batch_size: int
    lr: float
    seed: int

    def __post_init__(self) -> None:
        if not 0.0 < self.min_contradiction <= 1.0:
            raise ConfigError(
                "min_contradiction", f"must be in (0, 1], got {self.min_contradiction}"
            )
        for key in ("max_per_fact", "epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if not self.lr > 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")


@dataclass
class Kept:
    """One training example: a fact's index and a question's actions (termination included)."""

    fact: int
    token_ids: list[int]
    text: str
    log_r: float


def select_questions(
    entries: Mapping[str, Sequence[Mapping[str, Any]]],
    fact_keys: Sequence[str],
    cfg: SmoothConfig,
) -> list[Kept]:
    """The counted contradictions of a buffer state, best first within each fact.

    Args:
        entries: ``{prompt_key: [entry dict, ...]}`` as in the checkpoint's buffer state
            (``token_ids``, ``log_r``, ``components`` with ``genuine`` and ``log_c``, ``text``).
        fact_keys: the prompt key of each training fact (index = fact index); keys of other
            facts are ignored.
        cfg: selection thresholds.

    Returns:
        Entries with ``components.genuine == 1`` and ``log_c >= log(min_contradiction)``, at most
        ``max_per_fact`` per fact, one per normalised text within a fact, ordered by fact index
        then by decreasing ``log_r``.
    """
    min_log_c = math.log(cfg.min_contradiction)
    kept: list[Kept] = []
    for fact, key in enumerate(fact_keys):
        rows = sorted(entries.get(key, ()), key=lambda e: -float(e["log_r"]))
        seen: set[str] = set()
        for e in rows:
            comps = e.get("components", {})
            if comps.get("genuine") != 1.0 or float(comps.get("log_c", -math.inf)) < min_log_c:
                continue
            norm = normalize_text(e.get("text", ""))
            if norm in seen:
                continue
            seen.add(norm)
            kept.append(Kept(fact, list(e["token_ids"]), e.get("text", ""), float(e["log_r"])))
            if len(seen) == cfg.max_per_fact:
                break
    return kept


def question_nll(
    policy: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    questions: Sequence[Sequence[int]],
    sampler_cfg: Any,
    pad_id: int,
) -> Tensor:
    """Mean over rows of -log P_policy(question | prompt), the sampler's masks applied.

    Args:
        prompts: ``B`` prompt token-id lists (unpadded).
        questions: ``B`` action lists, each ending with the termination token.

    Returns:
        A scalar tensor (differentiable through the policy's trainable parameters).
    """
    from contraq.lm.sampling import score_actions
    from contraq.lm.tokens import left_pad, right_pad

    device = next(policy.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)
    # Padding actions with the termination token: everything after the first one is masked.
    actions = right_pad(questions, sampler_cfg.termination_token_id, device)
    log_pf, _ = score_actions(policy, ids, mask, actions, sampler_cfg)
    return -log_pf.sum(dim=1).mean()


class SmoothModule(L.LightningModule):
    """Lightning wrapper: the NLL of kept questions under the policy's LoRA."""

    def __init__(
        self,
        policy: torch.nn.Module,
        prompts: Sequence[Sequence[int]],
        sampler_cfg: Any,
        pad_id: int,
        lr: float,
    ) -> None:
        super().__init__()
        self.policy, self.prompts = policy, [list(p) for p in prompts]
        self.sampler_cfg, self.pad_id, self.lr = sampler_cfg, pad_id, lr
        self.losses: list[float] = []

    def training_step(self, batch: list[Kept], batch_idx: int) -> Tensor:
        loss = question_nll(
            self.policy,
            [self.prompts[k.fact] for k in batch],
            [k.token_ids for k in batch],
            self.sampler_cfg,
            self.pad_id,
        )
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)


def buffer_state(run_dir: Path) -> dict[str, Any]:
    """The replay buffer stored in the run's newest intact checkpoint."""
    from contraq.run.folder import find_resume_checkpoint, load_checkpoint_file

    ckpt_dir = run_dir / "checkpoints"
    path = find_resume_checkpoint("auto", ckpt_dir, Path)
    if path is None:
        raise SmoothError(f"{ckpt_dir}: no checkpoint (train the run first)")
    raw = load_checkpoint_file(path).get("contraq_buffer")
    if raw is None:
        raise SmoothError(f"{path}: no replay buffer in the checkpoint (a Redis buffer?)")
    state = json.loads(raw)
    if "entries" not in state:
        raise SmoothError(
            f"{path}: the buffer lives in Redis ({state.get('backend')}); smooth reads "
            "checkpointed memory buffers only"
        )
    return state


def smooth_run(run_dir: Path, out_dir: Path, cfg: SmoothConfig) -> dict[str, Any]:
    """Fit a fresh LoRA to ``run_dir``'s counted buffer questions; write a run folder.

    Returns the summary also written to ``out_dir/smooth.json``.
    """
    from omegaconf import OmegaConf

    from contraq.buffer import prompt_key
    from contraq.run.folder import write_run_config
    from contraq.run.load import load_run_config
    from contraq.run.parts import Parts, build_prompts, run_split

    run_cfg = load_run_config(run_dir)
    state = buffer_state(run_dir)
    facts = run_split(run_cfg).train
    parts = Parts(run_cfg, with_lora=True)
    prompts = build_prompts(run_cfg, facts, parts.tokenizer)
    kept = select_questions(state["entries"], [prompt_key(p) for p in prompts], cfg)
    if not kept:
        raise SmoothError(
            f"{run_dir}: no counted question with contradiction >= {cfg.min_contradiction} "
            "in the buffer; lower min_contradiction"
        )
    L.seed_everything(cfg.seed, workers=False, verbose=False)
    pad = parts.tokenizer.pad_token_id
    pad = parts.tokenizer.eos_token_id if pad is None else pad
    module = SmoothModule(parts.policy, prompts, parts.sampler_cfg, int(pad), cfg.lr)
    loader = torch.utils.data.DataLoader(
        kept, batch_size=cfg.batch_size, shuffle=True, collate_fn=list
    )
    trainer = L.Trainer(
        max_epochs=cfg.epochs,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
    )
    trainer.fit(module, loader)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts.policy.save_pretrained(str(out_dir / "adapter"))
    smoothed = OmegaConf.merge(run_cfg, {"name": out_dir.name, "output_dir": str(out_dir)})
    write_run_config(out_dir, OmegaConf.to_yaml(smoothed), keep_previous=False)
    summary = {
        "source_run": str(run_dir),
        "config": asdict(cfg),
        "kept": len(kept),
        "facts": len({k.fact for k in kept}),
        "loss_first_epoch": _mean(module.losses[: len(loader)]),
        "loss_last_epoch": _mean(module.losses[-len(loader) :]),
        "questions": [{"subject": facts[k.fact].subject, "question": k.text} for k in kept],
    }
    (out_dir / "smooth.json").write_text(json.dumps(summary, indent=2))
    log.info(
        "smooth: %d questions of %d facts; NLL %.2f -> %.2f; wrote %s",
        summary["kept"],
        summary["facts"],
        summary["loss_first_epoch"],
        summary["loss_last_epoch"],
        out_dir,
    )
    return summary


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def run_smooth(cfg: Any) -> Path:
    """`contraq smooth run=RUN out=DIR`: the composed ``configs/smooth.yaml``, checked, then
    :func:`smooth_run`. Raises a one-line error for a bad setting or an existing ``out``."""
    from contraq.config.settings import typed
    from contraq.run.load import resolve_run

    s = typed(SmoothConfig, cfg)
    out = Path(s.out)
    if (out / "config.yaml").exists():
        raise SmoothError(f"{out}: already a run folder; choose another out=")
    smooth_run(resolve_run(s.run).run_dir, out, s)
    return out
