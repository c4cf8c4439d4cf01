"""The likelihood reward: the base LM's own log-probability of a question.

Cost: one teacher-forced base-model pass for ``terminal`` and the same single pass for
``prefixes`` (exact for every prefix).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from contraq.lm.tokens import decode_questions
from contraq.reward.base import (
    RewardOutput,
    batch_logprobs,
    check_rows,
    frozen_base,
    prefix_log_pq,
    prefix_states,
    question_lengths,
)

if TYPE_CHECKING:
    from contraq.data import EditFact
    from contraq.lm.sampling import SampleBatch


@dataclass
class LikelihoodRewardConfig:
    """Keys of ``configs/reward/likelihood.yaml`` (see :class:`LikelihoodReward`)."""

    name: str = "likelihood"
    min_len: int = 0  # shorter questions get min_log_r
    min_log_r: float = -50.0
    batch_size: int = 0  # rows per teacher-forced pass (0: the whole batch)


class LikelihoodReward:
    """``log R(x) = log P_base(x | prompt)``, termination included, padding excluded.

    Exact per prefix from ONE teacher-forced base pass:
    ``log R(s_t + term) = sum_{j<t} log P_base(a_j | s_j) + log P_base(term | s_t)``.
    """

    def __init__(
        self,
        policy: nn.Module,
        tokenizer: Any,
        termination_token_id: int,
        min_len: int = 0,
        min_log_r: float = -50.0,
        batch_size: int = 0,
    ) -> None:
        """
        Args:
            policy: the ``peft.PeftModel`` policy (its base is used, adapters disabled).
            tokenizer: decodes the questions.
            termination_token_id: id of the token ending a question.
            min_len: questions with fewer tokens before termination get ``min_log_r``.
            min_log_r: floor log-reward (also for non-finite values).
            batch_size: rows per forward pass (0: the whole batch).
        """
        self.policy = policy
        self.tokenizer = tokenizer
        self.term_id = int(termination_token_id)
        self.min_len = int(min_len)
        self.min_log_r = float(min_log_r)
        self.batch_size = int(batch_size)

    def _logprobs(self, batch: SampleBatch) -> tuple[Tensor, Tensor]:
        with frozen_base(self.policy) as lm:
            return batch_logprobs(lm, batch, self.term_id, self.batch_size)

    def _floor(self, log_r: Tensor, n_tokens: Tensor) -> tuple[Tensor, Tensor]:
        n_nonfinite = (~torch.isfinite(log_r)).float()
        floor = torch.full_like(log_r, self.min_log_r)
        log_r = torch.where((n_tokens < self.min_len) | (n_nonfinite > 0), floor, log_r)
        return log_r, n_nonfinite

    def terminal(
        self, facts: Sequence[EditFact], batch: SampleBatch, step: int = 0
    ) -> RewardOutput:
        """See :class:`Reward`; ``facts`` only fixes the batch size here."""
        check_rows(facts, batch, type(self).__name__)
        tok_lp, _ = self._logprobs(batch)
        log_pq = tok_lp.sum(1)
        n_tok = question_lengths(
            batch.actions.to(log_pq.device), batch.lengths.to(log_pq.device), self.term_id
        )
        log_r, n_nonfinite = self._floor(log_pq, n_tok)
        clean_pq = torch.where(n_nonfinite > 0, torch.full_like(log_pq, self.min_log_r), log_pq)
        return RewardOutput(
            log_r=log_r,
            components={"log_pq": clean_pq, "length": n_tok.float(), "n_nonfinite": n_nonfinite},
            answers=None,
            questions=decode_questions(self.tokenizer, batch.actions, batch.lengths),
        )

    def prefixes(
        self, facts: Sequence[EditFact], batch: SampleBatch, step: int = 0, min_len: int = 0
    ) -> Tensor:
        """See :class:`Reward`. ``[b, t]`` is ``log P_base(a_<t, term | prompt)``; prefixes
        shorter than this reward's ``min_len`` get ``min_log_r``."""
        check_rows(facts, batch, type(self).__name__)
        tok_lp, term_lp = self._logprobs(batch)
        lengths = batch.lengths.to(tok_lp.device)
        t = torch.arange(tok_lp.shape[1], device=tok_lp.device)[None, :].expand_as(tok_lp)
        log_r, _ = self._floor(prefix_log_pq(tok_lp, term_lp), t)
        defined = prefix_states(lengths, tok_lp.shape[1], min_len)
        return torch.where(defined, log_r, torch.zeros_like(log_r))
