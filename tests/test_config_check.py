"""contraq.config.checks: every shipped config validates, bad values name their key, secrets
are masked, relaunch differences are listed (issue 9)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from contraq.config import schema
from contraq.config.checks import (
    ConfigError,
    check_relaunch,
    config_diff,
    masked,
    one_line_errors,
    validate,
)
from contraq.config.schema import compose_run

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CHOICES = [
    f"{g.name}={p.stem}"
    for g in sorted(CONFIGS.iterdir())
    if g.is_dir()
    for p in sorted(g.glob("*.yaml"))
]


def _compose(*overrides: str, config: str = "train"):
    with one_line_errors():  # what `contraq train` does: composition errors as ConfigError
        return compose_run(CONFIGS, overrides, config)


@pytest.mark.parametrize("override", CHOICES)
def test_every_shipped_choice_validates(override: str) -> None:
    cfg = _compose(override, config="demo")  # demo = train + the evaluation group
    if override == "model=local":  # name_or_path must come from the user
        with pytest.raises(ConfigError, match=r"^model\.name_or_path: must be set"):
            validate(cfg)
    elif override == "loss=subtb":  # its prefixes have no batch to share a reward with
        with pytest.raises(ConfigError, match=r"^reward\.w_share: .* add reward\.w_share=0$"):
            validate(cfg)
        validate(_compose(override, "reward.w_share=0", config="demo"))
    else:
        validate(cfg)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.n_samples=0", "train.n_samples: must be an integer >= 1, got 0"),
        ("train.lr=abc", "train.lr: must be a number > 0, got 'abc'"),
        ("train.pf_temp_prob=1.5", "train.pf_temp_prob: must be a number in [0, 1], got 1.5"),
        ("loss.name=xyz", "loss.name: must be one of 'tb', 'subtb', 'vargrad', got 'xyz'"),
        (
            "buffer=redis buffer.port=70000",
            "buffer.port: must be an integer in [1, 65535], got 70000",
        ),
        ("prompt.template='About_{object}'", "prompt.template: must be a template using only"),
        ("data.val_fraction=0.95", "data.val_fraction: data.val_fraction + data.test_fraction"),
        ("sampler.max_len=3", "sampler.min_len: must be < sampler.max_len (3), got 5"),
        ("train.sampling=all", "train.sampling: must be one of 'per_rank'"),
        ("train.replay.prob=1.5", "train.replay.prob: must be a number in [0, 1], got 1.5"),
        ("train.max_steps=0", "train.max_steps: must be an integer >= 1, got 0"),
        ("model.lora_r=0", "model.lora_r: must be an integer >= 1, got 0"),
        ("loss=vargrad train.n_samples=1", "train.n_samples: must be >= 2 for loss=vargrad"),
        ("loss=subtb reward.w_div=5", "reward.w_div: must be 0 with loss=subtb"),
        ("reward.w_div=-1", "reward.w_div: must be a number >= 0, got -1"),
        ("loss=subtb reward.w_share=1", "reward.w_share: must be 0 with loss=subtb"),
        ("reward.w_share=-1", "reward.w_share: must be a number >= 0, got -1"),
        ("reward.div_gate=facts", "reward.div_gate: must be one of 'none'"),
        ("reward.frozen_weights=fp8", "reward.frozen_weights: must be one of 'auto', 'shared'"),
        ("train.replay.prioritized=maybe", "train.replay.prioritized: must be true or false"),
        ("train.reward_temp.start=0", "train.reward_temp.start: must be a number > 0, got 0"),
        ("train.reward_temp.horizon=x", "train.reward_temp.horizon: must be an integer >= 1"),
        ("train.lrr=1", "train.lrr: Key 'lrr' not in 'TrainConfig'"),
        ("reward.w_likk=1", "reward.w_likk: Key 'w_likk' not in 'ContradictionRewardConfig'"),
        ("reward.beta=sharp", "reward.beta: must be a number > 0, got 'sharp'"),
        ("loss=nope", "loss: no option 'nope' (one of: subtb, tb, vargrad)"),
        (
            "callbacks.model_checkpoint.every_n_train_steps=0",
            "callbacks.model_checkpoint.every_n_train_steps: must be an integer >= 1, got 0",
        ),
        ("~callbacks.stop_on_signal", "callbacks.stop_on_signal: is required"),
        ("~callbacks.model_checkpoint", "callbacks.model_checkpoint: is required"),
        (
            "callbacks.model_checkpoint.dirpath=elsewhere",
            "callbacks.model_checkpoint.dirpath: must be <output_dir>/checkpoints",
        ),
        (
            "callbacks.checkpoint_every_n_steps=5",
            "callbacks.checkpoint_every_n_steps: moved to "
            "callbacks.model_checkpoint.every_n_train_steps",
        ),
        ("callbacks.progress_bar=none", "callbacks.progress_bar: is a callback node"),
    ],
)
def test_bad_values_name_the_key_and_what_is_accepted(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate(_compose(*override.split()))
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_passwords_are_masked_and_nothing_else() -> None:
    cfg = {"buffer": {"password": "pw", "port": 1}, "model": {"termination_token": "?"}}
    assert masked(cfg) == {"buffer": {"password": "***", "port": 1}, "model": cfg["model"]}
    assert masked({"password": None}) == {"password": None}


def test_relaunch_diff_ignores_length_and_bookkeeping(tmp_path: Path) -> None:
    def run(steps: int, **train: object) -> dict:
        c = OmegaConf.to_container(_compose(f"train.max_steps={steps}"), resolve=True)
        c["train"].update(train)
        return c

    old = run(10)
    assert config_diff(old, run(20)) == []  # the horizon follows max_steps: not a difference
    new = run(10, lr=1e-3)
    new["callbacks"]["model_checkpoint"]["every_n_train_steps"] = 99  # bookkeeping
    del new["callbacks"]["progress_bar"]
    assert config_diff(old, new) == ["train.lr: 0.0002 -> 0.001"]
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(old))
    check_relaunch(tmp_path, run(30), "auto")
    check_relaunch(tmp_path, new, "never")
    with pytest.raises(ConfigError, match=r"output_dir: .*train\.lr: 0\.0002 -> 0\.001"):
        check_relaunch(tmp_path, new, "auto")


def test_saved_configs_of_older_versions_are_upgraded_to_todays_keys():
    from contraq.config.upgrade import upgrade_saved_config

    old = {
        "reward": {"name": "contradiction", "reward_temp_start": 2.0, "reward_temp_end": 1.0},
        "buffer": {"backend": "memory", "use_buffer_prob": 0.5, "prioritized": False},
        "train": {"max_steps": 80},
        "demo": {"n_facts": 32},
    }
    new = upgrade_saved_config(old)
    assert new == {
        "reward": {"name": "contradiction"},
        "buffer": {"backend": "memory"},
        "train": {
            "max_steps": 80,
            "reward_temp": {"start": 2.0, "end": 1.0},
            "replay": {"prob": 0.5, "prioritized": False},
        },
    }
    assert old["reward"]["reward_temp_start"] == 2.0  # the caller's dict is left alone
    assert upgrade_saved_config(new) == new


@pytest.mark.parametrize("bar", ["rich", "none"])
def test_saved_flat_callbacks_keys_are_upgraded_and_relaunch(tmp_path: Path, bar: str) -> None:
    """A run folder written before the callbacks became `_target_` nodes."""
    from contraq.config.upgrade import upgrade_saved_config

    flat = {
        "checkpoint_every_n_steps": 7,
        "keep_step_checkpoints": 2,
        "samples_every_n_steps": 3,
        "progress_bar": bar,
    }
    new = upgrade_saved_config({"callbacks": flat})["callbacks"]
    assert new["model_checkpoint"] == {"every_n_train_steps": 7, "save_top_k": 2}
    assert new["sample_writer"] == {"every_n_steps": 3}
    rich = {"_target_": "lightning.pytorch.callbacks.RichProgressBar", "leave": True}
    assert new.get("progress_bar") == (rich if bar == "rich" else None)
    # Its relaunch with today's configs and the same values is accepted; a trained key is not.
    saved = OmegaConf.to_container(_compose("train.max_steps=10"), resolve=True)
    saved["callbacks"] = flat
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    relaunch = OmegaConf.to_container(_compose("train.max_steps=20"), resolve=True)
    check_relaunch(tmp_path, relaunch, "auto")
    relaunch["train"]["lr"] = 1e-3
    with pytest.raises(ConfigError, match=r"train\.lr: 0\.0002 -> 0\.001"):
        check_relaunch(tmp_path, relaunch, "auto")


def test_a_key_added_to_the_schema_later_is_no_difference_at_its_default(tmp_path: Path) -> None:
    """A run written before `model.gradient_checkpointing` existed still resumes (found when
    a 160-step run was continued), unless the relaunch sets the new key to another value."""
    from contraq.config.schema import RunConfig

    schema = OmegaConf.to_container(OmegaConf.structured(RunConfig), resolve=False)
    saved = OmegaConf.to_container(_compose("train.max_steps=10"), resolve=True)
    del saved["model"]["gradient_checkpointing"]
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    relaunch = OmegaConf.to_container(_compose("train.max_steps=20"), resolve=True)
    with pytest.raises(ConfigError, match="model.gradient_checkpointing: '<absent>' -> False"):
        check_relaunch(tmp_path, relaunch, "auto")  # without the schema: refused
    check_relaunch(tmp_path, relaunch, "auto", defaults=schema)
    relaunch["model"]["gradient_checkpointing"] = True
    with pytest.raises(ConfigError, match=r"model.gradient_checkpointing: False -> True"):
        check_relaunch(tmp_path, relaunch, "auto", defaults=schema)


def test_baselines_of_a_run_written_before_a_new_key_are_reusable() -> None:
    """`baselines_from` compares the model/prompt/sampler/reward groups of two runs: an older
    run lacking `model.gradient_checkpointing` is the same model while the key is at its
    default (found when `cf-t12-320-s1` reused `cf-genuine`'s baselines)."""
    from contraq.evaluation.reuse import _differences

    new = _compose("train.max_steps=10")
    old = OmegaConf.to_container(_compose("train.max_steps=10"), resolve=True)
    del old["model"]["gradient_checkpointing"]
    settings = {"batch_size": 32, "dtype": "float32", "sample_weights": "float16"}
    assert _differences(settings, settings, old, new) == []
    old["model"]["lora_r"] = 4
    assert _differences(settings, settings, old, new) == ["run config model"]
    # A reward key added since (frozen_weights; found when the w_share runs reused base0's
    # baselines) is no difference at the value runs had before it (its dataclass default,
    # shared), a difference at another (the shipped config's auto: float16 answers on a CPU).
    old = OmegaConf.to_container(_compose("train.max_steps=10"), resolve=True)
    del old["reward"]["frozen_weights"]
    shared = _compose("train.max_steps=10", "reward.frozen_weights=shared")
    assert _differences(settings, settings, old, shared) == []
    assert _differences(settings, settings, old, new) == ["run config reward"]
    # An eval written before the sampler's weights were recorded sampled on the policy's own.
    before = {"batch_size": 32, "dtype": "float32"}
    assert _differences(before, {**before, "sample_weights": "shared"}, old, shared) == []
    assert _differences(before, settings, old, shared) == ["sample_weights"]


def test_baselines_compare_the_dtype_as_loaded() -> None:
    """`model.dtype=auto` is bfloat16 on one machine and float32 on another: the eval records
    the weights' dtype and `baselines_from` compares that, not the config's word. Evals
    written before it was recorded loaded float32."""
    from contraq.evaluation.reuse import _differences

    new = _compose("train.max_steps=10", "model.dtype=auto")
    old = OmegaConf.to_container(
        _compose("train.max_steps=10", "model.dtype=float32"), resolve=True
    )
    before = {"batch_size": 32}
    now = {"batch_size": 32, "sample_weights": "shared"}
    assert _differences(before, {**now, "dtype": "float32"}, old, new) == []
    assert _differences(before, {**now, "dtype": "bfloat16"}, old, new) == ["dtype"]


def test_baselines_from_a_copied_eval_folder_find_their_run(tmp_path: Path) -> None:
    """An eval folder copied with its run (docs/results/RUN/eval...) names a run folder that
    exists only where it was made: the parent holding config.yaml is that run."""
    from contraq.evaluation.reuse import earlier_run

    run = tmp_path / "docs" / "RUN"
    (run / "eval").mkdir(parents=True)
    gone = str(tmp_path / "outputs" / "RUN")
    assert earlier_run(run / "eval", gone) == Path(gone)  # no config beside it: as named
    (run / "config.yaml").write_text("name: RUN\n")
    assert earlier_run(run / "eval", gone) == run
    named = tmp_path / "outputs" / "RUN"
    named.mkdir(parents=True)
    (named / "config.yaml").write_text("name: RUN\n")
    assert earlier_run(run / "eval", gone) == named  # the named run wins while it exists


def _targets(node) -> list[str]:
    """Every ``_target_`` string under a plain config node."""
    if isinstance(node, dict):
        own = [node["_target_"]] if isinstance(node.get("_target_"), str) else []
        return own + [t for v in node.values() for t in _targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in _targets(v)]
    return []


def test_saved_targets_of_moved_modules_are_renamed_and_relaunch(tmp_path: Path) -> None:
    """A run folder written before the modules moved into packages (issue 27) names
    ``contraq.callbacks.*`` and ``contraq.runs.AppendingCSVLogger``: it loads with today's
    paths, and its relaunch with today's configs is no difference."""
    from contraq.config.upgrade import MOVED_MODULES, upgrade_saved_config

    saved = OmegaConf.to_container(_compose("train.max_steps=10", "logger=csv"), resolve=True)
    old_of = {new: old for old, new in MOVED_MODULES.items()}
    text = OmegaConf.to_yaml(saved)
    for target in set(_targets(saved)):
        module, _, name = target.rpartition(".")
        if module in old_of:
            text = text.replace(f"_target_: {target}\n", f"_target_: {old_of[module]}.{name}\n")
    assert "_target_: contraq.runs.AppendingCSVLogger" in text
    assert "_target_: contraq.callbacks.StepTimer" in text
    (tmp_path / "config.yaml").write_text(text)
    old = OmegaConf.to_container(OmegaConf.load(tmp_path / "config.yaml"))
    assert sorted(_targets(upgrade_saved_config(old))) == sorted(_targets(saved))
    relaunch = OmegaConf.to_container(_compose("train.max_steps=20", "logger=csv"), resolve=True)
    check_relaunch(tmp_path, relaunch, "auto")


@pytest.mark.parametrize(
    "path",
    sorted((CONFIGS.parent / "docs" / "results").glob("*/config.yaml")),
    ids=lambda p: p.parent.name,
)
def test_committed_run_configs_name_importable_targets(path: Path) -> None:
    """The run folders under docs/results were saved before the modules moved: read back as a
    run folder's config is (:func:`contraq.run.load.load_run_config`), every ``_target_`` is an
    object that exists today."""
    from hydra.utils import get_object

    from contraq.run.load import load_run_config

    cfg = OmegaConf.to_container(load_run_config(path.parent), resolve=False)
    targets = _targets(cfg)
    assert any(t.startswith("contraq.") for t in targets)
    for target in targets:
        assert callable(get_object(target)), target


def test_each_key_is_declared_once_with_its_check_in_its_dataclass() -> None:
    from dataclasses import fields

    from contraq.config.checks import OPEN_RULES, rules
    from contraq.config.schema import SCHEMAS

    for group in SCHEMAS:
        names = {f.name for f in fields(group)}
        assert set(group.CHECKS) <= names, group  # a check names one of its own fields
        prefix = f"{group.KEY}." if group.KEY else ""
        assert not {prefix + n for n in group.CHECKS} & set(OPEN_RULES), group
    assert rules()["train.replay.prob"](1.5) == "a number in [0, 1]"


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: schema.ReplayConfig(prob=1.5),
            "train.replay.prob: must be a number in [0, 1], got 1.5",
        ),
        (lambda: schema.TrainConfig(sampling="all"), "train.sampling: must be one of 'per_rank'"),
        (
            lambda: schema.RewardTempConfig(start=0),
            "train.reward_temp.start: must be a number > 0, got 0",
        ),
        (
            lambda: schema.SamplerOptions(top_p=0),
            "sampler.top_p: must be a number in (0, 1], got 0",
        ),
        (lambda: schema.ModelConfig(lora_r=0), "model.lora_r: must be an integer >= 1, got 0"),
        (
            lambda: schema.ModelConfig(source="hub"),
            "model.name_or_path: must be set for model.source=hub",
        ),
    ],
)
def test_a_group_built_in_code_checks_its_keys_like_the_run_config(
    build: Callable[[], object], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        build()
    assert str(info.value).startswith(message)


def test_a_saved_config_read_back_is_checked_by_its_groups() -> None:
    """validate builds the groups from an untyped config (a run folder's config.yaml): a
    value of the wrong type gets the key's rule message, not OmegaConf's."""
    cfg = OmegaConf.to_container(_compose(), resolve=True)
    cfg["train"]["replay"]["prob"] = "often"
    with pytest.raises(ConfigError, match=r"^train\.replay\.prob: must be a number in \[0, 1\]"):
        validate(OmegaConf.create(cfg))
