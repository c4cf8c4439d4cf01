"""The reward named by the ``reward`` config group."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import nn

from contraq.reward.base import Reward, dataclass_from
from contraq.reward.contradiction import ContradictionReward
from contraq.reward.likelihood import LikelihoodReward, LikelihoodRewardConfig

if TYPE_CHECKING:
    from contraq.judge.scorer import NLIScorer


def build_reward(
    cfg: Mapping[str, Any],
    policy: nn.Module,
    tokenizer: Any,
    termination_token_id: int,
    nli: NLIScorer | None = None,
) -> Reward:
    """The reward named by ``cfg.name`` (``configs/reward/*.yaml``).

    Args:
        cfg: the ``reward`` config group: ``name: contradiction`` (keys of
            :class:`ContradictionRewardConfig`) or ``name: likelihood`` (keys of
            :class:`LikelihoodRewardConfig`).
        policy: the ``peft.PeftModel`` policy.
        nli: the NLI judge, required by the contradiction reward.

    Raises:
        ValueError: unknown name, missing judge, or a bad field (named).
    """
    name = cfg.get("name")
    if name == "contradiction":
        if nli is None:
            raise ValueError("reward config name='contradiction' needs an NLIScorer (nli=...)")
        embedder = None
        if any(float(cfg.get(k, 0.0) or 0.0) != 0.0 for k in ("w_div", "w_share")):
            from contraq.lm.embedding import Embedder

            embedder = Embedder(device=next(policy.parameters()).device)
        return ContradictionReward(policy, tokenizer, nli, cfg, termination_token_id, embedder)
    if name == "likelihood":
        c = dataclass_from(LikelihoodRewardConfig, cfg, "reward")
        return LikelihoodReward(
            policy,
            tokenizer,
            termination_token_id,
            min_len=c.min_len,
            min_log_r=c.min_log_r,
            batch_size=c.batch_size,
        )
    raise ValueError(f"reward config field name={name!r}: expected 'contradiction' or 'likelihood'")
