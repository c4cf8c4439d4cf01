"""The two editors `contraq edit` runs on the base LM.

- ``ft``: the fine-tuning baseline of the editing literature as a batch edit: one LoRA adapter
  for all facts, fitted by Adam to ``-log P(new object | edit prompt)`` (mean per target token)
  plus ``kl_weight * KL(base || edited)`` on control texts: other facts' true sentences, of the
  edited relations first (:func:`control_facts`), so the relation's other subjects keep
  their answers.
- ``in_context``: no training; every answering prompt starts with the edit stated
  (:func:`contraq.editing.dataset.context_for`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from contraq.config.checks import ConfigError
from contraq.data import EditFact, load_facts
from contraq.editing.scores import (
    Row,
    control_logprobs,
    encode_rows,
    kl_to_base,
    target_logprobs,
)
from contraq.files import resolve_path
from contraq.lm.models import ModelConfig, attach_lora

log = logging.getLogger(__name__)
EDITORS = ("ft", "in_context", "external")


@dataclass
class FTSettings:
    """The fine-tuning editor (``ft.*`` of ``configs/edit.yaml``)."""

    lr: float
    steps: int
    kl_weight: float
    lora_r: int
    lora_alpha: int
    target_modules: list[str] | None
    control: str
    n_control: int
    kl_positions: int
    seed: int

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ConfigError("ft.lr", f"must be > 0, got {self.lr}")
        for key in ("steps", "lora_r", "lora_alpha"):
            if getattr(self, key) < 1:
                raise ConfigError(f"ft.{key}", f"must be >= 1, got {getattr(self, key)}")
        if self.kl_weight < 0:
            raise ConfigError("ft.kl_weight", f"must be >= 0, got {self.kl_weight}")
        if self.kl_positions < 1:
            raise ConfigError("ft.kl_positions", f"must be >= 1, got {self.kl_positions}")
        if self.n_control < 0:
            raise ConfigError("ft.n_control", f"must be >= 0, got {self.n_control}")


def relation(fact: EditFact) -> str | None:
    """The fact's prompt with its subject taken out: facts of one relation, as CounterFact
    phrases it, share it ("{} was born in")."""
    if not fact.prompt or fact.subject not in fact.prompt:
        return None
    return fact.prompt.replace(fact.subject, "{}", 1)


def control_facts(path: str, edited: Sequence[EditFact], n: int, seed: int) -> list[EditFact]:
    """``n`` facts of ``path`` whose subjects are not edited (and whose true sentences name no
    edited subject): first, in turn, facts of each edit's relation (an FT edit spreads to its
    relation's other subjects), then a seeded random fill."""
    if n == 0:
        return []
    subjects = {f.subject.lower() for f in edited}
    pool = [
        f
        for f in load_facts(resolve_path(path))
        if f.subject.lower() not in subjects
        and not any(s in (f.original_fact or "").lower() for s in subjects)
    ]
    random.Random(seed).shuffle(pool)
    by_relation: dict[str | None, list[EditFact]] = {}
    for f in pool:
        by_relation.setdefault(relation(f), []).append(f)
    chosen: list[EditFact] = []
    queues = [by_relation.get(relation(f), []) for f in edited if relation(f) is not None]
    while len(chosen) < n and any(queues):
        for q in queues:
            if q and len(chosen) < n:
                chosen.append(q.pop(0))  # popped: a fact shared by two edits is taken once
    taken = {id(f) for f in chosen}
    chosen += [f for f in pool if id(f) not in taken][: n - len(chosen)]
    return chosen


def edit_rows(tokenizer: Any, facts: Sequence[EditFact]) -> list[Row]:
    """(edit prompt, new object) rows of the facts (a fact needs ``prompt`` and
    ``edited_answer``: the full schema)."""
    bad = [f for f in facts if not f.prompt or not f.edited_answer]
    if bad:
        raise ConfigError(
            "editor", f"ft needs each fact's prompt and edited_answer; {bad[0].where} lacks them"
        )
    return encode_rows(
        tokenizer, [f.prompt or "" for f in facts], [f.edited_answer or "" for f in facts]
    )


def _nll(lm: nn.Module, rows: Sequence[Row], pad: int) -> torch.Tensor:
    total, _ = target_logprobs(lm, rows, pad)
    n_tok = torch.tensor([len(t) for _, t in rows], device=total.device, dtype=total.dtype)
    return -(total / n_tok).mean()


def fit_ft(
    base: nn.Module,
    tokenizer: Any,
    facts: Sequence[EditFact],
    control: Sequence[EditFact],
    s: FTSettings,
    mcfg: ModelConfig,
) -> tuple[nn.Module, list[dict[str, float]]]:
    """A LoRA on ``base`` fitted to all ``facts`` at once (full batch, ``s.steps`` Adam steps).

    Returns:
        ``(peft model, history)``: one ``{step, nll, kl, loss}`` per step.
    """
    from dataclasses import replace

    torch.manual_seed(s.seed)
    lcfg = replace(
        mcfg, lora_r=s.lora_r, lora_alpha=s.lora_alpha, lora_target_modules=s.target_modules
    )
    policy = attach_lora(base, lcfg)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = edit_rows(tokenizer, facts)
    seqs = [list(tokenizer(f.original_fact or f.edit_fact)["input_ids"]) for f in control]
    base_lp = mask = None
    if seqs and s.kl_weight > 0:
        with torch.no_grad(), policy.disable_adapter():
            base_lp, mask = control_logprobs(policy, seqs, pad, s.kl_positions)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=s.lr)
    history = []
    for step in range(s.steps):
        nll = _nll(policy, rows, pad)
        kl = torch.zeros((), device=nll.device)
        if base_lp is not None and mask is not None:
            logp, _ = control_logprobs(policy, seqs, pad, s.kl_positions)
            kl = kl_to_base(base_lp, logp, mask)
        loss = nll + s.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append({"step": step + 1, "nll": nll.item(), "kl": kl.item(), "loss": loss.item()})
        log.info("edit step %d/%d: nll %.3f kl %.4f", step + 1, s.steps, nll.item(), kl.item())
    policy.eval()
    for p in params:
        p.requires_grad_(False)
    return policy, history
