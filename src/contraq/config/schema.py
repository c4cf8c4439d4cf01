"""The schema of a run config: one dataclass per config group, registered in Hydra's ConfigStore.

``configs/train.yaml`` starts its defaults list with ``run_schema`` (:class:`RunConfig`), so the
group files merge into typed nodes: ``contraq train --cfg job`` shows every default, and a
value of the wrong type or an unknown key fails while the config is composed (turned into one
line by :func:`contraq.config.checks.one_line_errors`). The YAML files keep only the choices a
user makes. The reward group has one schema per reward (``reward/contradiction_schema``,
``reward/likelihood_schema``), named in the defaults list of each reward file.

Groups owned by other layers stay open here (``nli``, ``buffer``, ``trainer``, ``logger``,
``eval``, ``demo``): their readers check their own keys (and
:data:`contraq.config.checks.OPEN_RULES` up front).

Each key is declared once, in its group's dataclass: its type and default as a field, its range
or choices in the class's ``CHECKS`` (wording from :mod:`contraq.rules`), applied by
``__post_init__`` whenever the group is built (:func:`load_group`,
:func:`contraq.config.checks.validate`, code). ``KEY`` is the group's dotted path in the run
config, so an error names ``train.replay.prob``, not ``prob``. Checks of several keys stay in
:mod:`contraq.config.checks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, DictConfig, OmegaConf

from contraq.lm.models import ModelConfig
from contraq.reward.contradiction import ContradictionRewardConfig
from contraq.reward.likelihood import LikelihoodRewardConfig
from contraq.rules import (
    Check,
    boolean,
    check_fields,
    choice,
    integer,
    number,
    optional,
    run_name,
    string_list,
    text,
)
from contraq.rules import template as format_template  # `template` is a PromptConfig field

T = TypeVar("T")

# The raw few-shot template asks for the sentence's missing end: SmolLM2-135M writes a question
# for 78% of 36 held-out CounterFact prompts with it, 8-15% with any chat-template request tried
# (measured at T=1).
RAW_TEMPLATE = (
    "Turn each sentence into a question about its missing end.\n"
    "Sentence: The capital of France is ...\n"
    "Question: What is the capital of France?\n"
    "Sentence: Hamlet was written by ...\n"
    "Question: Who wrote Hamlet?\n"
    "Sentence: {prompt} ...\n"
    "Question:"
)


@dataclass
class PromptConfig:
    """The question prompt; ``{subject}``, ``{edit_fact}`` and ``{prompt}`` come from the fact.

    ``use_chat_template``: true sends ``template`` through the tokenizer's chat template,
    ``auto`` when it has one; false uses ``raw_template``.
    """

    template: str = "Ask a short question about this: {prompt} ..."
    raw_template: str = RAW_TEMPLATE
    use_chat_template: Any = False  # true | false | auto

    KEY: ClassVar[str] = "prompt"
    CHECKS: ClassVar[dict[str, Check]] = {
        "template": format_template,
        "raw_template": format_template,
        "use_chat_template": choice("auto", True, False),
    }

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class ReplayConfig:
    """Replay from the buffer (read by the training step, ``GFlowNetModule.make_batch``)."""

    prob: float = 0.25  # chance that a step replays from the buffer instead of sampling
    prioritized: bool = True  # replay P ~ softmax(log R); false: uniform

    KEY: ClassVar[str] = "train.replay"
    CHECKS: ClassVar[dict[str, Check]] = {"prob": number(0, 1), "prioritized": boolean}

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class RewardTempConfig:
    """The loss uses ``log R / T``, T linear from ``start`` to ``end`` over ``horizon`` steps.

    Not annealed from 2 (red-teaming's schedule): T=2 also halves the prior's weight, and on
    CounterFact 45 steps of it drove fresh samples from log P_Q -28 to -54 and the counted
    contradiction rate from 0.16 to 0.06.
    """

    start: float = 1.0
    end: float = 1.0
    horizon: int = 0  # a run config's default: train.max_steps (RunConfig)

    KEY: ClassVar[str] = "train.reward_temp"
    # horizon: any integer here (<= 0: `end` at once); a run's must be >= 1, as it follows
    # train.max_steps (config.checks.RUN_RULES).
    CHECKS: ClassVar[dict[str, Check]] = {
        "start": number(0, lo_open=True),
        "end": number(0, lo_open=True),
    }

    def __post_init__(self) -> None:
        check_fields(self)

    def at(self, step: int) -> float:
        """T at ``step``: linear from ``start`` (step 0) to ``end`` (step ``horizon``), then
        ``end``; ``horizon <= 0`` means ``end`` from the first step."""
        if self.horizon <= 0 or step >= self.horizon:
            return float(self.end)
        return float(self.start + (self.end - self.start) * max(step, 0) / self.horizon)


@dataclass
class TrainConfig:
    """The training loop (``train``): what one step draws and how the optimizer runs.

    ``pf_temp_*``: with probability ``pf_temp_prob`` a step samples at
    ``T ~ U[pf_temp_low, pf_temp_high]`` (off-policy exploration). ``sampling``: ``per_rank``
    (each rank its own slice), ``rank0`` (rank 0 samples for all and scatters) or
    ``rank0_broadcast`` (contraq.training.distributed).
    """

    # 160: 80 more steps raised the held-out counted rate by +0.08 (paired, two seeds agree;
    # docs/EXPERIMENTS.md). About 22 minutes on 2 quiet CPU cores with SmolLM2-135M.
    max_steps: int = 160
    facts_per_step: int = 2  # edit facts per step
    n_samples: int = 8  # questions per fact per step
    lr: float = 2.0e-4  # LoRA (5e-4 collapsed to one question per fact by step 60)
    logz_lr: float = 1.0e-2  # log Z head (TB): larger, as in the GFlowNet literature
    weight_decay: float = 0.0
    lr_warmup_steps: int = 10  # LoRA only: log Z starts at its batch estimate, full lr
    grad_clip: float | None = 1.0
    pf_temp_prob: float = 0.5
    pf_temp_low: float = 0.5
    # 1.2, not red-teaming's 2.0: above ~1.5 SmolLM2-135M writes 20-token gibberish that
    # teaches nothing (docs/EXPERIMENTS.md section 6); the GPU preset keeps 2.0.
    pf_temp_high: float = 1.2
    sampling: str = "per_rank"
    # How a sampled step draws each fact's n_samples questions: iid (independent draws) or
    # distinct (without replacement, contraq.lm.stochastic_beam): the loss then sees n distinct
    # questions per fact instead of the policy's favourite repeated.
    draw: str = "iid"
    # Chance that a sampled step draws from the base LM (adapters off) instead of the policy:
    # off-policy exploration from the reward's prior, whose counted questions are exact draws
    # of the GFlowNet's target, so the policy keeps seeing the target's other modes.
    base_prob: float = 0.0
    # What the sampler's passes run on: shared (the policy's weights) or float16 (a CPU copy
    # whose frozen Linear weights take 2 bytes, the LoRA adapters shared: contraq.lm.float16_copy);
    # auto: float16 for a float32 policy on the CPU, shared elsewhere. The loss stays float32.
    sample_weights: str = "auto"
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    reward_temp: RewardTempConfig = field(default_factory=RewardTempConfig)

    KEY: ClassVar[str] = "train"
    CHECKS: ClassVar[dict[str, Check]] = {
        "max_steps": integer(1),
        "facts_per_step": integer(1),
        "n_samples": integer(1),
        "lr": number(0, lo_open=True),
        "logz_lr": number(0, lo_open=True),
        "weight_decay": number(0),
        "lr_warmup_steps": integer(0),
        "grad_clip": optional(number(0)),
        "pf_temp_prob": number(0, 1),
        "pf_temp_low": number(0, lo_open=True),
        "pf_temp_high": number(0, lo_open=True),
        "sampling": choice("per_rank", "rank0", "rank0_broadcast"),
        "draw": choice("iid", "distinct"),
        "base_prob": number(0, 1),
        "sample_weights": choice("auto", "shared", "float16"),
    }

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class LossConfig:
    """``tb``: trajectory balance with a learned log Z; ``vargrad``: trajectory balance with
    log Z estimated per fact from the step's own questions
    (:func:`contraq.training.losses.vargrad_loss`); ``subtb``: modified sub-trajectory balance, each sub-trajectory of L transitions weighted
    ``subtb_lambda^(L-1)``."""

    name: str = "tb"
    subtb_lambda: float = 1.0

    KEY: ClassVar[str] = "loss"
    CHECKS: ClassVar[dict[str, Check]] = {
        "name": choice("tb", "subtb", "vargrad"),
        "subtb_lambda": number(0, lo_open=True),
    }

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class SamplerOptions:
    """The sampler's user choices (``contraq.run.parts.sampler_config`` adds the tokenizer's ids).

    Banned: the tokenizer's special tokens, every token containing a newline (a question is
    one line ending with the termination token) and ``extra_banned_tokens``.
    """

    min_len: int = 5  # termination masked before this many tokens
    max_len: int = 20  # only termination allowed at the last slot
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    ban_penalty: float = 1.0e4  # subtracted from banned logits (finite: log-probs stay finite)
    extra_banned_tokens: list[str] = field(default_factory=list)

    KEY: ClassVar[str] = "sampler"
    CHECKS: ClassVar[dict[str, Check]] = {
        "min_len": integer(0),
        "max_len": integer(1),
        "top_k": integer(0),
        "top_p": number(0, 1, lo_open=True),
        "ban_penalty": number(0, lo_open=True),
        "extra_banned_tokens": string_list,
    }

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class DataConfig:
    """Edit facts, split BY SUBJECT (blake2b of subject + seed): the fractions are shares of
    subjects. The test split is held out: training never sees it."""

    name: str = MISSING
    path: str = MISSING  # relative: from the current folder, else the repo root
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 0
    max_fact_chars: int = 2000  # longest accepted field; longer rows are skipped with file:line

    KEY: ClassVar[str] = "data"
    CHECKS: ClassVar[dict[str, Check]] = {
        "path": text,
        "val_fraction": number(0, 1),
        "test_fraction": number(0, 1),
        "split_seed": integer(0),
        "max_fact_chars": integer(1),
    }

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class RunConfig:
    """The whole ``contraq train`` config (``configs/train.yaml`` and its groups)."""

    name: str = "default"  # the run's folder is outputs/<name>; relaunching resumes it
    output_dir: str = "outputs/${name}"
    seed: int = 0
    resume: str | None = (
        "auto"  # auto: <output_dir>/checkpoints/last.ckpt if present; never; a path
    )
    prompt: PromptConfig = field(default_factory=PromptConfig)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            reward_temp=RewardTempConfig(horizon=II("train.max_steps"))  # type: ignore[arg-type]
        )
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampler: SamplerOptions = field(default_factory=SamplerOptions)
    loss: LossConfig = field(default_factory=LossConfig)
    # name -> a callback's `_target_` node (configs/callbacks/,
    # contraq.training.callbacks.build_callbacks): a dict, so a new name needs `+` and an old flat key (callbacks.progress_bar=none) fails.
    callbacks: dict[str, dict[str, Any]] = field(default_factory=dict)
    reward: Any = None
    nli: Any = None
    buffer: Any = None
    trainer: Any = None
    logger: Any = None
    eval: Any = None
    # Set by `contraq demo` only (configs/demo.yaml: the evaluation group after training);
    # never part of a run folder's config.yaml.
    evaluation: Any = None

    # The run's own keys; `name` also names its folder (checked before Hydra runs too).
    KEY: ClassVar[str] = ""
    CHECKS: ClassVar[dict[str, Check]] = {"name": run_name, "output_dir": text, "seed": integer(0)}

    def __post_init__(self) -> None:
        check_fields(self)


# Every dataclass with config keys (CHECKS), and the typed groups of RunConfig in the order
# `config.checks.validate` builds them (each builds its nested groups).
SCHEMAS: tuple[Any, ...] = (
    RunConfig,
    PromptConfig,
    TrainConfig,
    ReplayConfig,
    RewardTempConfig,
    SamplerOptions,
    LossConfig,
    DataConfig,
    ModelConfig,
)
GROUPS: dict[str, type] = {
    "prompt": PromptConfig,
    "train": TrainConfig,
    "sampler": SamplerOptions,
    "loss": LossConfig,
    "data": DataConfig,
    "model": ModelConfig,
}


def register_schemas() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent); call before composing."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="reward", name="contradiction_schema", node=ContradictionRewardConfig)
    cs.store(group="reward", name="likelihood_schema", node=LikelihoodRewardConfig)


# `+key=value` may add keys only where a reader takes any key: new `_target_` nodes of these
# groups, Hydra's own settings, keys read when present, and Lightning Trainer arguments.
ADDABLE_GROUPS = ("callbacks", "logger", "hydra")
OPTIONAL_KEYS = ("ddp_audit_dir",)  # contraq.training.callbacks.build_callbacks reads it when set


def _trainer_arguments() -> set[str]:
    import inspect

    import lightning as L

    return set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}


def _in_schema(path: list[str]) -> bool:
    """Whether ``path`` names a key of :class:`RunConfig`'s typed groups (or leaves them)."""
    node: Any = OmegaConf.to_container(OmegaConf.structured(RunConfig), resolve=False)
    for part in path:
        if node is None:
            return True  # an open group (Any): its reader checks its keys
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def check_added_keys(overrides: Sequence[str], group_dirs: Path) -> None:
    """Refuse ``+key=value`` (and ``++key=value``) for a key that no part of contraq reads:
    Hydra adds any such key, so ``+trian.lr=0.5`` trained at the default lr and saved
    ``trian:`` in config.yaml. ``group_dirs``: the config folder (``+group=option`` is fine).

    Raises:
        ConfigError: naming the key.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from contraq.errors import ConfigError

    added = [o for o in overrides if o.startswith("+")]
    try:
        parsed = OverridesParser.create().parse_overrides(added) if added else []
    except HydraException:
        return  # Hydra reports a malformed override itself, in one line
    fields = set(RunConfig.__dataclass_fields__)
    for o in parsed:
        key = o.key_or_group
        top, *rest = key.split(".")
        if "/" in key or (not rest and (group_dirs / top).is_dir()) or top in ADDABLE_GROUPS:
            continue  # a config group's option, or a group that takes new nodes
        if (top in OPTIONAL_KEYS and not rest) or (
            top == "trainer" and rest[:1] and rest[0] in _trainer_arguments()
        ):
            continue
        if top in fields and o.is_force_add() and _in_schema(key.split(".")):
            continue  # ++ on a key that exists sets it
        raise ConfigError(
            key,
            "no part of contraq reads this key (a typo?); `contraq train --cfg job` lists "
            "every setting",
        )


def run_defaults() -> dict[str, Any]:
    """:class:`RunConfig`'s defaults as a plain nested dict (interpolations unresolved): what
    a run folder written before a key existed is read as having (``config.checks.fill_absent``)."""
    out = OmegaConf.to_container(OmegaConf.structured(RunConfig), resolve=False)
    assert isinstance(out, dict)
    return out


def compose_run(
    config_dir: str | Path, overrides: Sequence[str] = (), config: str = "train"
) -> DictConfig:
    """The run config ``contraq train <overrides>`` (or ``contraq demo``: ``config="demo"``)
    composes from ``config_dir`` (outside ``hydra.main``: presets, benchmarks, tests)."""
    from hydra import compose, initialize_config_dir

    register_schemas()
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        return compose(config, overrides=list(overrides))


def load_group(cfg: DictConfig, key: str, schema: type[T]) -> T:
    """The group ``cfg[key]`` as its ``schema`` dataclass, resolved. Works on a composed run
    config and on one read back from a run folder (``config.yaml``, untyped): types and keys
    are checked against the schema either way."""
    plain = OmegaConf.to_container(cfg[key], resolve=True)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), plain))  # type: ignore[return-value]
