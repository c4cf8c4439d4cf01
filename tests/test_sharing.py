"""Reward sharing by meaning cluster (``reward.w_share``): a step's counted contradictions of one
fact that ask the same thing share its reward, so the policy gains by spreading over probes."""

from __future__ import annotations

import math

import pytest
import torch

from contraq.lm.embedding import cluster_crowding
from contraq.reward.combine import combine_log_reward
from contraq.reward.contradiction import ContradictionRewardConfig, counted_log_r


def test_cluster_crowding_counts_masked_rows_of_one_group_and_meaning() -> None:
    # Rows 0-2 point one way (one meaning), row 3 another; row 4 points like row 0 but is not
    # counted; row 5 points like row 0 but belongs to another fact.
    e = torch.tensor([[1.0, 0.0], [1.0, 0.05], [0.98, -0.05], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    groups = ["a", "a", "a", "a", "a", "b"]
    mask = torch.tensor([True, True, True, True, False, True])
    assert cluster_crowding(e, groups, mask).tolist() == [3.0, 3.0, 3.0, 1.0, 1.0, 1.0]
    # Counted row 4 joins the crowd; nothing counted: all ones.
    assert cluster_crowding(e, groups, torch.ones(6, dtype=torch.bool)).tolist()[:5] == [
        4.0
    ] * 3 + [
        1.0,
        4.0,
    ]
    assert cluster_crowding(e, groups, torch.zeros(6, dtype=torch.bool)).tolist() == [1.0] * 6
    with pytest.raises(ValueError, match="5 groups"):
        cluster_crowding(e, groups[:5], mask)


@pytest.mark.slow
def test_cluster_crowding_merges_paraphrases_not_probes(embedder) -> None:
    qs = [
        "What is the capital of France?",
        "Which city is France's capital?",
        "Where is the capital of France?",
        "Where does the French government sit?",
        "What is the official language of France?",
    ]
    crowd = cluster_crowding(embedder.encode(qs), ["f"] * 5, torch.ones(5, dtype=torch.bool))
    assert crowd.tolist() == [3.0, 3.0, 3.0, 1.0, 1.0]


def test_sharing_term_by_hand() -> None:
    """log R loses w_share * log k; w_share 0 or k = 1 leaves it as it was."""

    def log_r(w_share: float, crowding: torch.Tensor) -> list[float]:
        out, _ = combine_log_reward(
            torch.tensor([-0.1, -0.1, -0.1]),
            torch.tensor([-10.0, -10.0, -10.0]),
            torch.full((3,), 9),
            w_lik=1.0,
            min_len=0,
            min_log_r=-500.0,
            beta=0.1,
            crowding=crowding,
            w_share=w_share,
        )
        return out.tolist()

    k = torch.tensor([1.0, 2.0, 4.0])
    assert log_r(0.0, k) == pytest.approx([-11.0] * 3)
    assert log_r(1.0, k) == pytest.approx([-11.0, -11.0 - math.log(2), -11.0 - math.log(4)])
    assert log_r(2.0, k) == pytest.approx([-11.0, -11.0 - 2 * math.log(2), -11.0 - 2 * math.log(4)])
    # Each of k equal rows keeps 1 / k of the reward: together they earn what one row earns.
    assert math.exp(log_r(1.0, k)[2]) * 4 == pytest.approx(math.exp(-11.0))
    cfg = ContradictionRewardConfig(w_share=1.0)
    ones = torch.ones(2)
    with pytest.raises(ValueError, match="needs each question's crowding"):
        counted_log_r(cfg, -ones, ones.bool(), -ones, ones)
    with pytest.raises(ValueError, match="w_share=-1.0"):
        ContradictionRewardConfig(w_share=-1.0)
