"""Every config choice composes, and the pieces the code reads are present."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from contraq.config.schema import (
    RewardTempConfig,
    TrainConfig,
    compose_run,
    load_group,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GROUPS = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir())


def _compose(*overrides: str, config: str = "train"):
    return compose_run(CONFIGS, overrides, config)


@pytest.mark.parametrize(
    "override",
    [
        f"{g}={p.stem}" if g != "experiment" else f"+{g}={p.stem}".lstrip("+")
        for g in GROUPS
        for p in sorted((CONFIGS / g).glob("*.yaml"))
    ],
)
def test_every_choice_composes_and_resolves(override: str) -> None:
    cfg = _compose(override, config="demo")  # demo = train + the evaluation group
    # Resolving catches broken interpolations (the trainer reads ${train.max_steps}, ...).
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert container["trainer"]["max_steps"] == cfg.train.max_steps


def test_experiment_overrides_win_over_defaults() -> None:
    # `_self_` comes first in train.yaml's defaults, so an experiment may override train.*.
    cfg = _compose("experiment=smoke")
    assert cfg.train.max_steps == 20 and cfg.model.source == "tiny"
    assert cfg.trainer.max_steps == 20


def test_default_is_the_embedded_model_with_the_contradiction_reward() -> None:
    cfg = _compose()
    assert cfg.model.source == "smollm2"
    assert cfg.reward.name == "contradiction" and cfg.nli.name == "minilm-zsre"
    assert cfg.loss.name == "tb" and cfg.buffer.backend == "memory"
    assert cfg.reward.min_len == cfg.sampler.min_len


def test_training_loop_keys_live_in_the_train_group() -> None:
    # Replay and the reward temperature are read by the training loop: train.replay.*,
    # train.reward_temp.*; the horizon follows train.max_steps unless set.
    cfg = _compose("train.max_steps=60", "train.replay.prob=0.5")
    train = load_group(cfg, "train", TrainConfig)
    assert train.replay.prob == 0.5 and train.replay.prioritized is True
    assert train.reward_temp == RewardTempConfig(start=1.0, end=1.0, horizon=60)
    assert "reward_temp_start" not in cfg.reward and "use_buffer_prob" not in cfg.buffer
    lik = load_group(_compose("experiment=likelihood"), "train", TrainConfig)
    assert (lik.reward_temp.start, lik.reward_temp.end) == (0.5, 0.5)
    gpu = load_group(_compose("experiment=gpu-gpt2-large"), "train", TrainConfig)
    assert gpu.reward_temp.horizon == 1000 and gpu.max_steps == 2000


def test_load_group_checks_a_config_read_back_from_a_run_folder() -> None:
    saved = OmegaConf.create(OmegaConf.to_container(_compose(), resolve=True))  # untyped
    assert load_group(saved, "train", TrainConfig) == load_group(_compose(), "train", TrainConfig)
    saved.train.lrr = 1.0
    with pytest.raises(Exception, match="lrr"):
        load_group(saved, "train", TrainConfig)


def test_reward_temperature_schedule() -> None:
    def t(step: int, start: float, end: float, horizon: int) -> float:
        return RewardTempConfig(start, end, horizon).at(step)

    assert t(0, 1.0, 0.5, 200) == 1.0
    assert t(100, 1.0, 0.5, 200) == pytest.approx(0.75)
    assert t(50, 1.0, 0.5, 200) == pytest.approx(0.875)
    assert t(200, 1.0, 0.5, 200) == 0.5
    assert t(10_000, 1.0, 0.5, 200) == 0.5
    assert t(3, 2.0, 1.0, 0) == 1.0  # no horizon: end at once
    assert t(5, 0.5, 1.5, 10) == pytest.approx(1.0)  # rising works too
