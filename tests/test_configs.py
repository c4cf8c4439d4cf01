"""Every config choice composes, and the pieces the code reads are present."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GROUPS = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir())


def _compose(*overrides: str, config: str = "train"):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config, overrides=list(overrides))


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
