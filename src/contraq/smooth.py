"""`contraq smooth RUN --out DIR`: maximum likelihood on a trained run's best questions.

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
from torch.nn.utils.rnn import pad_sequence

from contraq.errors import UserError
from contraq.genuine import normalize_text

log = logging.getLogger(__name__)


class SmoothError(UserError, ValueError):
    """The run cannot be smoothed (no buffer, no counted question); the message says why."""


@dataclass
class SmoothConfig:
    """What to keep from the buffer and how to fit it.

    ``min_contradiction``: the judged contradiction probability a kept question's answer needs
    (entries must also be counted: a question whose answer is no echo). ``max_per_fact``: the
    highest-reward distinct questions kept per training fact.
    """

    min_contradiction: float = 0.5
    max_per_fact: int = 4
    epochs: int = 4
    batch_size: int = 8
    lr: float = 2e-4
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "min_contradiction": 0.0 < self.min_contradiction <= 1.0,
            "max_per_fact": self.max_per_fact >= 1,
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise SmoothError(
                f"smooth: {bad[0]}={getattr(self, bad[0])!r} is out of range "
                "(min_contradiction in (0, 1], max_per_fact/epochs/batch_size >= 1, lr > 0)"
            )


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
    from contraq.sampler import score_actions

    device = next(policy.parameters()).device

    def stack(rows: Sequence[Sequence[int]], side: str, value: int) -> Tensor:
        seqs = [torch.tensor(list(r), dtype=torch.long) for r in rows]
        return pad_sequence(seqs, batch_first=True, padding_value=value, padding_side=side)

    ids = stack(prompts, "left", pad_id).to(device)
    mask = stack([[1] * len(p) for p in prompts], "left", 0).to(device)
    # Padding actions with the termination token: everything after the first one is masked.
    actions = stack(questions, "right", sampler_cfg.termination_token_id).to(device)
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
    from contraq.runs import find_resume_checkpoint, load_checkpoint_file

    ckpt_dir = run_dir / "checkpoints"
    path = find_resume_checkpoint("auto", ckpt_dir, lambda p: Path(p))
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
    from contraq.evaluate import load_run_config
    from contraq.train import Parts, build_prompts, load_split

    run_cfg = load_run_config(run_dir)
    state = buffer_state(run_dir)
    facts = load_split(run_cfg).train
    parts = Parts(run_cfg, with_lora=True)
    prompts = build_prompts(run_cfg, facts, parts.tokenizer)
    kept = select_questions(state["entries"], [prompt_key(p) for p in prompts], cfg)
    if not kept:
        raise SmoothError(
            f"{run_dir}: no counted question with contradiction >= {cfg.min_contradiction} "
            "in the buffer; lower --min-contradiction"
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
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(smoothed))
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


def smooth_main(argv: Sequence[str]) -> int:
    """``contraq smooth RUN --out DIR [--min-contradiction C] [--epochs N] ...``"""
    import argparse

    from contraq.evaluate import resolve_run

    p = argparse.ArgumentParser(
        prog="contraq smooth",
        description="Maximum likelihood on a trained run's counted buffer questions.",
    )
    p.add_argument("run", help="a trained run folder (its checkpoint holds the buffer)")
    p.add_argument("--out", required=True, help="the new run folder to write")
    defaults = SmoothConfig()
    for name, value in asdict(defaults).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = p.parse_args(list(argv))
    cfg = SmoothConfig(**{k: getattr(args, k) for k in asdict(defaults)})
    out = Path(args.out)
    if (out / "config.yaml").exists():
        raise SmoothError(f"{out}: already a run folder; choose another --out")
    smooth_run(resolve_run(args.run).run_dir, out, cfg)
    return 0
