"""How the contradiction reward combines its parts (pure tensor maths, docs/DESIGN.md section 2)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def nonfinite_count(parts: Sequence[Tensor]) -> Tensor:
    return torch.stack([(~torch.isfinite(p)).float() for p in parts]).sum(0)


def combine_log_reward(
    log_c: Tensor,
    log_pq: Tensor,
    n_tokens: Tensor,
    *,
    w_lik: float,
    min_len: int,
    min_log_r: float,
    beta: float = 1.0,
    log_pa: Tensor | None = None,
    w_ans: float = 0.0,
    novelty: Tensor | None = None,
    w_div: float = 0.0,
    crowding: Tensor | None = None,
    w_share: float = 0.0,
    step: int = 0,
    hybrid_steps: int = 0,
    hybrid_threshold: float = 0.5,
    hybrid_penalty: float = 10.0,
) -> tuple[Tensor, Tensor]:
    """The contradiction log-reward from its parts (all ``FloatTensor[N]``).

    ``log R = log C / beta + w_lik * log P_Q (+ w_ans * log P_A) (+ w_div * novelty)
    (- w_share * log crowding)``, ``crowding`` (>= 1) the rows that share the question's meaning
    (:func:`contraq.lm.embedding.cluster_crowding`); during
    the hybrid warm-up (``step < hybrid_steps``)
    ``log R = log P_Q - hybrid_penalty * [log C < log hybrid_threshold]``.
    Questions with ``n_tokens < min_len`` get ``min_log_r``; so does any row where a component
    or the result is NaN/inf (never raised).

    Returns:
        ``(log_r [N], n_nonfinite [N])``: the log-reward and the number of non-finite
        components per row.
    """
    parts = [log_c, log_pq] + ([log_pa] if log_pa is not None else [])
    n_nonfinite = nonfinite_count(parts)
    if step < hybrid_steps:
        below = (log_c < math.log(hybrid_threshold)).to(log_pq.dtype)
        log_r = log_pq - hybrid_penalty * below
    else:
        log_r = log_c / beta + w_lik * log_pq
        if log_pa is not None and w_ans != 0.0:
            log_r = log_r + w_ans * log_pa
        if novelty is not None and w_div != 0.0:
            log_r = log_r + w_div * novelty.to(log_r.device)
        if crowding is not None and w_share != 0.0:
            log_r = log_r - w_share * crowding.to(log_r.device).clamp(min=1.0).log()
    floor = torch.full_like(log_r, float(min_log_r))
    log_r = torch.where(n_tokens.to(log_r.device) < min_len, floor, log_r)
    bad = (n_nonfinite > 0) | ~torch.isfinite(log_r)
    return torch.where(bad, floor, log_r), n_nonfinite


def counted_log_c(log_c: Tensor, genuine_form: Tensor, floor: float) -> Tensor:
    """``log C`` as the reward counts it: clamped below at ``floor``, and ``floor`` itself
    where the text is not a question or its answer is an echo.

    Args:
        log_c: ``FloatTensor[N]`` log P_NLI(contradiction | edit, answer).
        genuine_form: ``BoolTensor[N]``: a question whose answer is not an echo.
    """
    floor_t = torch.full_like(log_c, float(floor))
    return torch.where(genuine_form.to(log_c.device), torch.maximum(log_c, floor_t), floor_t)
