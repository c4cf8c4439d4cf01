"""A teacher-forced pass with no padding: every prompt and question packed into one row.

A step's ``B`` questions are padded to the longest one, and about half of the question slots of
the loss pass are padding (``bench/bench_step.py`` prints the share); the policy's pass with
gradients is compute-bound on a CPU, so padding costs time in proportion. Here each distinct
prompt is laid out once, followed by the questions drawn from it, in one sequence, and a 4-D
attention mask lets each question token see its own prompt and its own earlier tokens only:

    [prompt 0][q0 of row 0][q0 of row 1][prompt 1][q1 of row 2] ...

Position ids restart at each prompt and continue into each of its questions, as in the padded
pass (``positions(mask)``), so the logits are the padded pass's up to float rounding. The
transformers attention implementations ``sdpa`` and ``eager`` take such a mask as it is; others
(flash) get the padded pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from contraq.lm.forward import distinct_prompts, forward, hf_model

_PACKING = [True]  # switched off only by no_packing (the benchmark's baseline)


@dataclass(frozen=True)
class Packed:
    """One packed row and where each padded slot's values come from.

    Attributes:
        ids: ``LongTensor[1, S]`` prompts without their padding, each followed by its
            questions' fed tokens (a question's last action is never fed).
        positions: ``LongTensor[1, S]``.
        allowed: ``BoolTensor[S, S]``: query ``i`` may attend key ``j``.
        keep: ``LongTensor[K]``: the positions whose logits are read (each prompt's last token
            and each fed question token).
        slot: ``LongTensor[B, T]``: for action ``t`` of row ``b``, the index into ``keep`` of the
            position that predicts it (0 for inactive slots).
        prompt_at: ``LongTensor[U, P]``: the packed position of each distinct prompt's slot
            ``p`` of the left-padded ``[U, P]`` layout (0 for padding).
        inverse: ``LongTensor[B]``: each row's distinct prompt.
    """

    ids: Tensor
    positions: Tensor
    allowed: Tensor
    keep: Tensor
    slot: Tensor
    prompt_at: Tensor
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
    n_rows, n_slots = actions.shape
    lengths = active.long().sum(1).tolist()
    prompt_lens = mask_u.long().sum(1).tolist()
    width = prompt_ids.shape[1]
    rows_of: list[list[int]] = [[] for _ in prompt_lens]
    for b, u in enumerate(inverse.tolist()):
        rows_of[u].append(b)
    pieces, pos, seg_u, seg_row = [], [], [], []
    keep: list[int] = []
    slot = torch.zeros((n_rows, n_slots), dtype=torch.long)
    prompt_at = torch.zeros((len(prompt_lens), width), dtype=torch.long)
    start = 0
    for u, p_len in enumerate(prompt_lens):
        pieces.append(ids_u[u, width - p_len :])
        pos.append(torch.arange(p_len))
        seg_u += [u] * p_len
        seg_row += [-1] * p_len
        prompt_at[u, width - p_len :] = torch.arange(start, start + p_len)
        start += p_len
        last_prompt = len(keep)
        keep.append(start - 1)
        for b in rows_of[u]:
            n_fed = max(lengths[b] - 1, 0)
            if lengths[b] > 0:
                slot[b, 0] = last_prompt
            pieces.append(actions[b, :n_fed])
            pos.append(torch.arange(p_len, p_len + n_fed))
            seg_u += [u] * n_fed
            seg_row += [b] * n_fed
            slot[b, 1 : n_fed + 1] = torch.arange(len(keep), len(keep) + n_fed)
            keep += range(start, start + n_fed)
            start += n_fed
    su, sr = torch.tensor(seg_u), torch.tensor(seg_row)
    causal = torch.ones((start, start), dtype=torch.bool).tril()
    own = (su[:, None] == su[None, :]) & ((sr[None, :] == -1) | (sr[:, None] == sr[None, :]))
    return Packed(
        ids=torch.cat([p.to(dev) for p in pieces])[None],
        positions=torch.cat(pos)[None].to(dev),
        allowed=(causal & own).to(dev),
        keep=torch.tensor(keep, dtype=torch.long, device=dev),
        slot=slot.to(dev),
        prompt_at=prompt_at.to(dev),
        inverse=inverse,
    )


def packing_usable(model: nn.Module) -> bool:
    """Whether :func:`packed_logits` applies: packing is on and the model's attention takes a
    4-D mask as it is (sdpa, eager)."""
    impl = getattr(hf_model(model).config, "_attn_implementation", None)
    return _PACKING[0] and impl in ("sdpa", "eager")


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
    """:func:`contraq.lm.sampling.teacher_forced_logits` in one packed row.

    Returns:
        ``(logits FloatTensor[B, T, V], hidden)``: the logits predicting each active action
        (0 in inactive slots); with ``output_hidden_states``, ``(prompt_hidden [B, P, H],)``,
        the last layer over each row's left-padded prompt (0 at its padding).
    """
    pk = pack_rows(prompt_ids, prompt_mask, actions, active)
    dtype = hf_model(model).get_input_embeddings().weight.dtype
    mask = torch.zeros(pk.allowed.shape, dtype=dtype, device=actions.device)
    mask = mask.masked_fill(~pk.allowed, torch.finfo(dtype).min)[None, None]
    logits, _, hidden = forward(
        model,
        pk.ids,
        mask,
        pk.positions,
        keep=pk.keep,
        use_cache=False,
        output_hidden_states=output_hidden_states,
    )
    picked = logits[0].float().index_select(0, pk.slot.flatten())
    picked = picked.view(*pk.slot.shape, -1)
    out = torch.where(active[..., None], picked, torch.zeros((), device=picked.device))
    if not output_hidden_states:
        return out, None
    last = hidden[-1][0]
    prompt_hidden = last.index_select(0, pk.prompt_at.flatten()).view(*pk.prompt_at.shape, -1)
    seen = (prompt_mask != 0)[..., None].to(last.dtype)
    return out, (prompt_hidden.index_select(0, pk.inverse) * seen,)
