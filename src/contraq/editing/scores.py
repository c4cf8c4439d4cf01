"""The editing literature's probes: does a cloze prompt complete with a given object?

Each probe is a (prompt, target) pair: the target's tokens (a space, then the object) are fed
after the prompt (teacher forcing) and the LM's argmax at each target position is read back.
A probe *completes with* the target when every argmax equals the target token, i.e. greedy
decoding from the prompt writes the object. Locality compares the argmaxes of the edited model
with the base LM's on the neighbour's true answer (as EasyEdit scores it), since a 135M LM
often does not know the neighbour's answer in the first place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from contraq.lm.forward import forward, positions
from contraq.lm.tokens import left_pad

Row = tuple[list[int], list[int]]  # (prompt ids, target ids)


@dataclass(frozen=True)
class TargetScore:
    """One teacher-forced probe: target token ids, the LM's argmax at each target position
    and the target's summed log-prob."""

    target: list[int]
    argmax: list[int]
    logprob: float

    @property
    def completes(self) -> bool:
        return self.argmax == self.target


def encode_rows(tokenizer: Any, prompts: Sequence[str], targets: Sequence[str]) -> list[Row]:
    """(prompt ids, target ids) per probe; the target is encoded on its own after a space, so
    its tokens are those the LM writes when it continues the prompt with the object."""
    rows: list[Row] = []
    for prompt, target in zip(prompts, targets, strict=True):
        p_ids = list(tokenizer(prompt.rstrip())["input_ids"])
        t_ids = list(tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"])
        rows.append((p_ids, t_ids))
    return rows


def target_logprobs(
    lm: nn.Module, rows: Sequence[Row], pad_id: int
) -> tuple[Tensor, list[list[int]]]:
    """``(FloatTensor[N] summed log P(target | prompt), argmax ids per row)``; differentiable
    when called with gradients on (the fine-tuning editor's loss). Rows are LEFT-padded so
    every target sits at the end, and the LM head runs on the last positions only."""
    device = next(lm.parameters()).device
    ids, mask = left_pad([p + t for p, t in rows], pad_id, device)
    keep = max(len(t) for _, t in rows) + 1
    logits, _, _ = forward(lm, ids, mask, positions(mask), keep=keep)
    logp = torch.log_softmax(logits.float(), dim=-1)
    totals, argmax = [], []
    for i, (_, t) in enumerate(rows):
        at = slice(keep - len(t) - 1, keep - 1)  # the positions that predict the target
        tgt = torch.tensor(t, device=device)
        totals.append(logp[i, at].gather(-1, tgt[:, None]).sum())
        argmax.append(logits[i, at].argmax(-1).tolist())
    return torch.stack(totals), argmax


@torch.no_grad()
def score_targets(
    lm: nn.Module, rows: Sequence[Row], pad_id: int, batch_size: int = 32
) -> list[TargetScore]:
    """:class:`TargetScore` per (prompt, target) row, ``batch_size`` rows per forward pass."""
    out: list[TargetScore] = []
    for lo in range(0, len(rows), batch_size):
        chunk = rows[lo : lo + batch_size]
        total, argmax = target_logprobs(lm, chunk, pad_id)
        out += [
            TargetScore(t, a, float(lp))
            for (_, t), a, lp in zip(chunk, argmax, total.tolist(), strict=True)
        ]
    return out


def agreement(a: TargetScore, b: TargetScore) -> float:
    """Share of target positions where two LMs' argmaxes agree (locality, per probe)."""
    if not a.argmax:
        return 1.0
    return sum(x == y for x, y in zip(a.argmax, b.argmax, strict=True)) / len(a.argmax)


def control_logprobs(
    lm: nn.Module, seqs: Sequence[list[int]], pad_id: int, keep: int
) -> tuple[Tensor, Tensor]:
    """Next-token log-probs ``[N, keep, V]`` at the last ``keep`` positions of whole token
    rows (LEFT-padded: a sentence's end, where a fact's object is written) and their mask
    ``[N, keep]`` (the rows the fine-tuning editor keeps close to the base)."""
    device = next(lm.parameters()).device
    ids, mask = left_pad(seqs, pad_id, device)
    keep = min(keep, ids.shape[1])
    logits, _, _ = forward(lm, ids, mask, positions(mask), keep=keep)
    return torch.log_softmax(logits.float(), dim=-1), mask[:, -keep:].bool()


def kl_to_base(base_logp: Tensor, logp: Tensor, mask: Tensor) -> Tensor:
    """Mean over the masked positions of ``KL(base || edited)`` of next-token distributions."""
    kl = (base_logp.exp() * (base_logp - logp)).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1)
