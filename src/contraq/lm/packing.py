"""A teacher-forced pass with no padding between questions: each prompt's questions in one row.

A step's ``B`` questions are padded to the longest one, and about half of the question slots of
the loss pass are padding (``bench/bench_step.py`` prints the share); the policy's pass with
gradients is compute-bound on a CPU, so padding costs time in proportion. Here each distinct
prompt is laid out once, followed by the questions drawn from it, one row per distinct prompt,
and a 4-D attention mask lets each question token see its own prompt and its own earlier tokens
only::

    row 0: [pad][prompt 0][q of row 0][q of row 1][q of row 4][pad]
    row 1: [   prompt 1  ][q of row 2][q of row 7][pad...........]

Prompts keep their left padding, so every prompt ends in the same column and the logits needed
are those of the last ``K`` columns. Position ids continue from each prompt into each of its
questions, as in the padded pass (``positions(mask)``), so the logits are the padded pass's up
to float rounding. Rows are prompts, not one row for all: the mask's cost grows with the square
of a row's length, and with every prompt distinct this is the padded pass. The transformers
attention implementations ``sdpa`` and ``eager`` take such a mask as it is; others (flash) get
the padded pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from contraq.lm.forward import additive_mask, distinct_prompts, forward, positions, takes_4d_mask

_PACKING = [True]  # switched off only by no_packing (the benchmark's baseline)


@dataclass(frozen=True)
class Packed:
    """The packed rows and where each padded slot's values come from.

    Attributes:
        ids: ``LongTensor[U, P + Q]``: each distinct prompt as it was (left-padded to ``P``),
            then its questions' fed tokens (a question's last action is never fed), then padding.
        positions: ``LongTensor[U, P + Q]``.
        allowed: ``BoolTensor[U, P + Q, P + Q]``: query ``i`` of a row may attend key ``j``
            (a padding slot sees only itself, so no query row is empty).
        keep: the number of last columns whose logits are read (``Q + 1``: the prompts' last
            column and the questions' columns).
        slot: ``LongTensor[B, T]``: for action ``t`` of row ``b``, the index into the flattened
            ``[U, keep]`` logits of the position that predicts it (0 for inactive slots).
        inverse: ``LongTensor[B]``: each row's distinct prompt (its packed row).
    """

    ids: Tensor
    positions: Tensor
    allowed: Tensor
    keep: int
    slot: Tensor
    inverse: Tensor


def pack_rows(prompt_ids: Tensor, prompt_mask: Tensor, actions: Tensor, active: Tensor) -> Packed:
    """The packed layout of a teacher-forced batch (pure: no model).

    Args:
        prompt_ids, prompt_mask: ``LongTensor[B, P]``, left-padded.
        actions: ``LongTensor[B, T]``.
        active: ``BoolTensor[B, T]``: the slots that hold an action (a prefix of each row).

    Returns:
        :class:`Packed`.
    """
    dev = actions.device
    ids_u, mask_u, inverse = distinct_prompts(prompt_ids, prompt_mask)
    n_prompts, width = ids_u.shape
    n_rows, n_slots = actions.shape
    lengths = active.long().sum(1).tolist()
    fed = [max(n - 1, 0) for n in lengths]  # tokens fed per row: the last action is not
    rows_of: list[list[int]] = [[] for _ in range(n_prompts)]
    for b, u in enumerate(inverse.tolist()):
        rows_of[u].append(b)
    n_q = max(sum(fed[b] for b in rows) for rows in rows_of)
    keep, total = n_q + 1, width + n_q
    ids = torch.zeros((n_prompts, total), dtype=actions.dtype, device=dev)
    ids[:, :width] = ids_u
    pos = torch.zeros((n_prompts, total), dtype=torch.long, device=dev)
    pos[:, :width] = positions(mask_u)
    # owner: -1 for a prompt token, the row b for a question token, -2 for padding
    owner = torch.full((n_prompts, total), -2, dtype=torch.long)
    owner[:, :width] = torch.where(mask_u.cpu() != 0, -1, -2)
    slot = torch.zeros((n_rows, n_slots), dtype=torch.long)
    prompt_lens = mask_u.long().sum(1).tolist()
    for u, rows in enumerate(rows_of):
        col = width
        for b in rows:
            n = fed[b]
            ids[u, col : col + n] = actions[b, :n]
            pos[u, col : col + n] = torch.arange(prompt_lens[u], prompt_lens[u] + n, device=dev)
            owner[u, col : col + n] = b
            if lengths[b] > 0:
                slot[b, 0] = u * keep  # the prompt's last column predicts action 0
            slot[b, 1 : n + 1] = u * keep + torch.arange(col - width + 1, col - width + 1 + n)
            col += n
    q, k = owner[:, :, None], owner[:, None, :]
    causal = torch.ones((total, total), dtype=torch.bool).tril()
    sees = ((k == -1) & (q != -2)) | ((q >= 0) & (k == q))
    allowed = (causal & sees) | torch.eye(total, dtype=torch.bool)
    return Packed(
        ids=ids,
        positions=pos,
        allowed=allowed.to(dev),
        keep=keep,
        slot=slot.to(dev),
        inverse=inverse,
    )


def packing_usable(model: nn.Module) -> bool:
    """Whether :func:`packed_logits` applies: packing is on and the model's attention takes a
    4-D mask as it is (sdpa, eager)."""
    return _PACKING[0] and takes_4d_mask(model)


@contextlib.contextmanager
def no_packing() -> Iterator[None]:
    """The padded pass for the duration: the baseline of ``bench/bench_step.py``."""
    _PACKING[0] = False
    try:
        yield
    finally:
        _PACKING[0] = True


def packed_logits(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    actions: Tensor,
    active: Tensor,
    output_hidden_states: bool = False,
) -> tuple[Tensor, Any]:
    """:func:`contraq.lm.sampling.teacher_forced_logits` in packed rows (:func:`pack_rows`).

    Returns:
        ``(logits FloatTensor[B, T, V], hidden)``: the logits predicting each active action
        (0 in inactive slots); with ``output_hidden_states``, ``(prompt_hidden [B, P, H],)``,
        the last layer over each row's left-padded prompt (0 at its padding).
    """
    pk = pack_rows(prompt_ids, prompt_mask, actions, active)
    logits, _, hidden = forward(
        model,
        pk.ids,
        additive_mask(model, pk.allowed)[:, None],
        pk.positions,
        keep=pk.keep,
        use_cache=False,
        output_hidden_states=output_hidden_states,
    )
    flat = logits.float().reshape(-1, logits.shape[-1])  # [U * keep, V]
    picked = flat.index_select(0, pk.slot.flatten()).view(*pk.slot.shape, -1)
    out = torch.where(active[..., None], picked, torch.zeros((), device=picked.device))
    if not output_hidden_states:
        return out, None
    width = prompt_ids.shape[1]
    seen = (prompt_mask != 0)[..., None].to(hidden[-1].dtype)
    return out, (hidden[-1][:, :width].index_select(0, pk.inverse) * seen,)
