"""Token-id lists to padded tensors, and sampled actions back to question text.

The bottom layer: used by the sampler's callers (training module, reward, evaluation, benches)
so that every batch is padded and decoded the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def left_pad(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Left-padded ``(ids [B, P], mask [B, P])`` of token-id lists (prompts: generation
    continues from the right end of every row)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.long, device=device)
        mask[i, width - len(s) :] = 1
    return ids, mask


def right_pad(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> Tensor:
    """Right-padded ``LongTensor[B, T]`` of token-id lists (actions: row b's tokens first)."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), int(pad_id), dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(list(s), dtype=torch.long, device=device)
    return out


def decode_questions(tokenizer: Any, actions: Tensor, lengths: Tensor) -> list[str]:
    """The question text of each row: ``actions[b, :lengths[b]]`` decoded, special tokens
    (the termination token among them when it is one) skipped, whitespace stripped."""
    rows = [actions[b, : int(lengths[b])].tolist() for b in range(actions.shape[0])]
    return [q.strip() for q in tokenizer.batch_decode(rows, skip_special_tokens=True)]
