"""Checks of a run config before anything is loaded or written, and the run folder's config.

Where a key and its checks live:

- A key of a typed group (``prompt``, ``train`` with ``train.replay`` and ``train.reward_temp``,
  ``sampler``, ``loss``, ``data``, ``model``) and the run's own keys (``name``, ``output_dir``,
  ``seed``) are declared once, in their dataclass (:mod:`contraq.config.schema`,
  :class:`contraq.lm.models.ModelConfig`), with their range or choices in its ``CHECKS``
  (applied by its ``__post_init__``, wording from :mod:`contraq.rules`).
- The keys of the open groups (``reward``: two schemas, picked by ``reward.name``; ``eval``,
  ``buffer``, ``callbacks.*``, ``nli``, ``trainer``) keep their checks here, in
  :data:`OPEN_RULES`; so does a key stricter in a run than in its dataclass
  (:data:`RUN_RULES`: ``train.reward_temp.horizon``).
- Checks that tie several keys together, or a key to the file system, live here
  (:func:`_cross_checks`, :func:`_required_callbacks`, :func:`_checkpoint_dir`).

Functions:

- :func:`validate` checks every value the code reads, once, up front: it builds each typed
  group's dataclass from the composed config, applies :data:`OPEN_RULES`, then the cross-key
  checks. A bad value raises :class:`ConfigError` naming the full dotted key and what it
  accepts (the CLI prints that one line).
- :func:`masked` hides secrets (``*password*``) so the saved ``config.yaml`` never holds them.
- :func:`one_line_errors` turns Hydra's composition errors (a value of the wrong type or an
  unknown key of the structured config, :mod:`contraq.config.schema`) into the same one-line error.
- :func:`config_diff` lists the keys in which a relaunch differs from the run folder's config;
  :func:`check_relaunch` refuses such a relaunch (unless ``resume=never``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from contraq.config.upgrade import MOVED_KEYS, upgrade_saved_config
from contraq.errors import ConfigError as ConfigError  # re-exported: its readers import it here
from contraq.rules import (
    Check,
    choice,
    field_errors,
    integer,
    is_int,
    is_num,
    number,
    problem,
    run_name,
)
from contraq.rules import boolean as boolean  # re-exported: the CLI checks flags with it

MASK = "***"
# Keys that may change when a run is relaunched in its own folder: how long it runs and the
# bookkeeping (checkpoint/sample frequency, progress bar, the DDP audit folder). Everything
# else shapes what was trained, so a change is refused.
RELAUNCH_KEYS = frozenset({"resume", "train.max_steps", "trainer.max_steps", "ddp_audit_dir"})
RELAUNCH_PREFIXES = ("callbacks.",)

# A run's keys stricter than their dataclass: RewardTempConfig takes any horizon (<= 0: the
# end temperature at once, for code), a run's follows train.max_steps.
RUN_RULES: dict[str, Check] = {"train.reward_temp.horizon": integer(1)}

# The keys of the groups that RunConfig leaves open (no dataclass of the run schema holds
# them), with what they accept. A key that is absent from the config is not checked.
OPEN_RULES: dict[str, Check] = {
    "eval.n_facts": integer(0),
    "eval.n_samples": integer(1),
    "eval.every_n_steps": integer(1),
    "eval.diversity": boolean,
    "buffer.backend": choice("memory", "redis"),
    "buffer.max_size": integer(1),
    "buffer.near_dup_ratio": number(0, 1),
    "buffer.port": integer(1, 65535),
    "buffer.db": integer(0),
    "buffer.ssl": boolean,
    "buffer.autostart": boolean,
    "buffer.socket_timeout": number(0, lo_open=True),
    "buffer.retries": integer(0),
    "buffer.backoff": number(0),
    "reward.name": choice("contradiction", "likelihood"),
    "reward.min_len": integer(0),
    "reward.min_log_r": number(),
    "reward.w_lik": number(),
    "reward.w_ans": number(),
    "reward.w_div": number(0),
    "reward.w_share": number(0),
    "reward.div_gate": choice("none", "subject"),
    "reward.answer_gate": choice("none", "subject"),
    "reward.batch_size": integer(0),
    "reward.answer_max_new_tokens": integer(1),
    "reward.hybrid_steps": integer(0),
    "reward.hybrid_threshold": number(0, 1),
    "reward.beta": number(0, lo_open=True),
    "reward.count_only_genuine": boolean,
    "reward.judge_question": boolean,
    "reward.log_c_floor": number(-1e6, 0),
    "reward.frozen_weights": choice("auto", "shared", "float16", "int8"),
    "callbacks.model_checkpoint.every_n_train_steps": integer(1),
    "callbacks.model_checkpoint.save_top_k": integer(-1),
    "callbacks.model_checkpoint.save_last": choice(True),
    "callbacks.adapter_checkpoint.every_n_steps": integer(1),
    "callbacks.adapter_checkpoint.free_margin_mb": number(0),
    "callbacks.sample_writer.every_n_steps": integer(1),
    "nli.batch_size": integer(1),
    "nli.max_length": integer(1),
    "trainer.max_steps": integer(1),
}


@functools.cache
def rules() -> dict[str, Check]:
    """Every checked key (full dotted name) -> its check: the dataclasses', :data:`RUN_RULES`
    and :data:`OPEN_RULES`."""
    from contraq.config.schema import SCHEMAS
    from contraq.rules import rules_of

    return rules_of(SCHEMAS) | RUN_RULES | OPEN_RULES


def _get(cfg: Any, key: str) -> tuple[bool, Any]:
    """(present, value) of a dotted key in a plain (resolved) container."""
    node = cfg
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _cross_checks(cfg: Any) -> Iterator[ConfigError]:
    """Rules that tie several keys together."""
    get = lambda k: _get(cfg, k)[1]  # noqa: E731
    lo, hi = get("sampler.min_len"), get("sampler.max_len")
    if is_int(lo) and is_int(hi) and lo >= hi:
        yield ConfigError("sampler.min_len", f"must be < sampler.max_len ({hi}), got {lo}")
    lo, hi = get("train.pf_temp_low"), get("train.pf_temp_high")
    if is_num(lo) and is_num(hi) and lo > hi:
        yield ConfigError("train.pf_temp_low", f"must be <= train.pf_temp_high ({hi}), got {lo}")
    v, t = get("data.val_fraction"), get("data.test_fraction")
    if is_num(v) and is_num(t) and (v >= 1 or t >= 1 or v + t >= 1):
        yield ConfigError(
            "data.val_fraction",
            f"data.val_fraction + data.test_fraction must be < 1 (else no training facts), "
            f"got {v} + {t}",
        )
    if get("loss.name") == "vargrad" and is_int(n := get("train.n_samples")) and n < 2:
        yield ConfigError(
            "train.n_samples",
            f"must be >= 2 for loss=vargrad (it compares the questions of a fact), got {n}",
        )
    for key in ("reward.w_div", "reward.w_share"):
        w = get(key)
        if get("loss.name") == "subtb" and is_num(w) and w != 0:
            yield ConfigError(
                key,
                f"must be 0 with loss=subtb (a prefix has no batch to share with), got {w}: "
                f"add {key}=0",
            )
    yield from _checkpoint_dir(cfg)
    resume = get("resume")
    if not (resume is None or resume in ("auto", "never") or isinstance(resume, str)):
        yield ConfigError("resume", f"must be auto, never or a checkpoint path, got {resume!r}")


# The callbacks a run folder needs to stay resumable
# (contraq.training.callbacks.REQUIRED builds them).
REQUIRED_CALLBACKS = ("model_checkpoint", "adapter_checkpoint", "stop_on_signal")


def _required_callbacks(cfg: Any) -> Iterator[ConfigError]:
    """Without these the run folder has no resume point or clean stop (checked before
    resolving: the other callbacks interpolate their arguments)."""
    callbacks = cfg.get("callbacks") if isinstance(cfg, Mapping) else None
    for name in REQUIRED_CALLBACKS if isinstance(callbacks, Mapping) else ():
        if name not in callbacks:
            yield ConfigError(
                f"callbacks.{name}",
                "is required (the run folder's resume point); change its arguments, "
                "do not remove it",
            )


def _checkpoint_dir(cfg: Any) -> Iterator[ConfigError]:
    """last.ckpt must be written where resume looks for it."""
    out, ckpt = _get(cfg, "output_dir")[1], _get(cfg, "callbacks.model_checkpoint.dirpath")[1]
    paths = isinstance(out, str) and isinstance(ckpt, str)
    if paths and Path(ckpt).resolve() != Path(out).resolve() / "checkpoints":
        yield ConfigError(
            "callbacks.model_checkpoint.dirpath",
            f"must be <output_dir>/checkpoints (where resume looks), got {ckpt!r}",
        )


def _typed(schema: Any, values: Mapping[str, Any]) -> None:
    """Build ``schema`` (a group's dataclass) from ``values``: OmegaConf converts and checks the
    types, the dataclass's ``__post_init__`` its ranges (its own keys are checked first, so
    ``train.max_steps=0`` is named before the ``train.reward_temp.horizon`` that follows it). Keys it lacks keep their defaults;
    keys it does not declare are left to :data:`OPEN_RULES` and the cross-key checks."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    picked = {f.name: values[f.name] for f in fields(schema) if f.name in values}
    for err in field_errors(schema, picked):  # its own keys before its nested groups'
        raise err
    try:
        OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), picked))
    except MissingMandatoryValue as e:
        key = f"{schema.KEY}.{e.full_key}"
        raise ConfigError(key, f"missing; give {key}=...") from None
    except OmegaConfBaseException as e:
        raise _key_error(f"{schema.KEY}.{e.full_key}", e) from None
    except ConfigError:
        raise
    except ValueError as e:  # a check of several of the group's keys
        raise ConfigError(schema.KEY, str(e)) from None


def _check_groups(cfg: Any) -> None:
    """The run's own keys, then each typed group present in ``cfg`` (plain), in
    :data:`contraq.config.schema.GROUPS` order."""
    from contraq.config.schema import GROUPS, RunConfig

    for err in field_errors(RunConfig, cfg if isinstance(cfg, Mapping) else {}):
        raise err
    for key, schema in GROUPS.items():
        present, values = _get(cfg, key)
        if present and isinstance(values, Mapping):
            _typed(schema, values)


def validate(cfg: Any) -> None:
    """Raise :class:`ConfigError` for the first invalid value (key, value, what is accepted)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for err in _required_callbacks(cfg):
        raise err
    if OmegaConf.is_config(cfg):
        try:  # every interpolation resolves and no mandatory (???) value is missing
            cfg = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or "config"
            first = (str(e).splitlines() or [""])[0]
            raise ConfigError(str(key), f"cannot be resolved: {first}") from None
    _check_groups(cfg)
    for key, check in (RUN_RULES | OPEN_RULES).items():
        present, value = _get(cfg, key)
        if present and (err := problem(key, check, value)) is not None:
            raise err
    for err in _cross_checks(cfg):
        raise err


def composition_error(exc: BaseException) -> ConfigError:
    """One :class:`ConfigError` for a Hydra/OmegaConf composition error, naming the key.

    A key with a rule (:func:`rules`) gets the rule's message (``train.lr: must be a number
    > 0, got 'abc'``); any other error keeps OmegaConf's first line, or Hydra's message on one
    line (an unknown group option lists the available ones).
    """
    cause = exc
    while not getattr(cause, "full_key", None) and cause.__cause__ is not None:
        cause = cause.__cause__
    key = getattr(cause, "full_key", None)
    if not key:
        text = str(exc).split("Config search path")[0]
        missing = re.search(r"Could not find '(.+)/([^'/]*)'", text)
        if missing:  # an unknown option of a group: name the group and its options
            options = text.split("Available options in", 1)[-1].splitlines()[1:]
            listed = ", ".join(o.strip() for o in options if o.strip())
            return ConfigError(
                missing[1].replace("/", "."), f"no option {missing[2]!r} (one of: {listed})"
            )
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return ConfigError("config", "; ".join(lines))
    return _key_error(str(key), cause)


def _key_error(key: str, cause: BaseException) -> ConfigError:
    """The one-line error of OmegaConf's ``cause`` at ``key``: the key's rule's message when it
    has one (a value of the wrong type), else OmegaConf's first line."""
    value = getattr(cause, "value", None)
    if key in MOVED_KEYS:  # an override in an older layout
        return ConfigError(key, f"moved to {MOVED_KEYS[key]}")
    if key == "callbacks.progress_bar" and isinstance(value, str):
        return ConfigError(
            key,
            "is a callback node: callbacks/progress_bar=rich|tqdm, none: ~callbacks.progress_bar",
        )
    rule = rules().get(key)
    err = problem(key, rule, value) if rule is not None and value is not None else None
    return err or ConfigError(key, (str(cause).splitlines() or ["invalid"])[0])


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Run ``hydra.main`` so that a config that cannot be composed raises :class:`ConfigError`.

    Hydra prints such errors as a multi-line report and exits 1 unless ``HYDRA_FULL_ERROR`` is
    set, in which case it raises them: set it for the duration and convert.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    old = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    except (HydraException, OmegaConfBaseException) as e:
        raise composition_error(e) from None
    finally:
        if old is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = old


def masked(container: Any) -> Any:
    """A copy of a plain config container with every non-null ``*password*`` value masked."""
    if isinstance(container, Mapping):
        return {
            k: (MASK if "password" in str(k).lower() and v is not None else masked(v))
            for k, v in container.items()
        }
    if isinstance(container, list):
        return [masked(v) for v in container]
    return container


def check_name_override(overrides: list[str]) -> None:
    """Check ``name=`` before Hydra runs: Hydra creates the run folder ``outputs/<name>``
    before the job starts, so ``name=../../x`` wrote outside ``outputs/`` and a 300-character
    name failed with a traceback."""
    for override in overrides:
        key, sep, value = override.lstrip("+").partition("=")
        value = value.strip().strip("'\"")
        if key == "name" and sep and (expected := run_name(value)):
            raise ConfigError("name", f"must be {expected}, got {value[:80]!r}")


def refuse_secret_overrides(overrides: list[str]) -> None:
    """Refuse a ``*password*`` override with a value: Hydra writes the command line into the
    run folder (``.hydra/overrides.yaml``, ``hydra.yaml``, ``config.yaml``) and shells keep it
    in their history. ``key=null`` and ``~key`` are fine.

    Raises:
        ConfigError: naming the key and ``CONTRAQ_REDIS_PASSWORD``.
    """
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        leaf = key.rsplit(".", 1)[-1].lower()
        if sep and "password" in leaf and value.strip().strip("'\"") not in ("", "null"):
            raise ConfigError(
                key,
                "a password on the command line would be saved in the run's files; set it in "
                "the environment instead: export CONTRAQ_REDIS_PASSWORD=...",
            )


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): node}


def fill_absent(old: Any, new: Any, defaults: Any) -> Any:
    """``old`` (a saved config or group, plain) with the keys it lacks but ``new`` has taken
    from ``defaults`` (the schema's, nested alike): a key added to the schema after ``old``
    was written then compares equal while it keeps its default. Returns a new dict."""
    if not (isinstance(old, Mapping) and isinstance(new, Mapping)):
        return old
    defaults = defaults if isinstance(defaults, Mapping) else {}
    out = dict(old)
    for k, v in new.items():
        if k not in out and k in defaults:
            out[k] = defaults[k]
        elif k in out:
            out[k] = fill_absent(out[k], v, defaults.get(k))
    return out


def config_diff(
    old: Mapping[str, Any], new: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
) -> list[str]:
    """``key: old -> new`` for every key that differs, except :data:`RELAUNCH_KEYS`,
    ``callbacks.*`` and a reward-temperature horizon that follows ``train.max_steps``.

    ``defaults`` (the schema's, nested like ``new``) stand in for keys that ``old`` lacks: a
    key added to the schema after a run was written is no difference while it keeps its
    default, so such runs still resume.
    """
    a, b = _flatten(fill_absent(old, new, defaults or {})), _flatten(new)
    follows = "train.reward_temp.horizon"
    skip = set(RELAUNCH_KEYS)
    if a.get(follows) == a.get("train.max_steps") and b.get(follows) == b.get("train.max_steps"):
        skip.add(follows)  # the default horizon is ${train.max_steps}: it moves with it
    keys = sorted(k for k in (set(a) | set(b)) - skip if not k.startswith(RELAUNCH_PREFIXES))
    missing = "<absent>"
    return [
        f"{k}: {a.get(k, missing)!r} -> {b.get(k, missing)!r}"
        for k in keys
        if a.get(k, missing) != b.get(k, missing)
    ]


def check_relaunch(
    run_dir: Path, new: Mapping[str, Any], resume: Any, defaults: Mapping[str, Any] | None = None
) -> None:
    """Refuse a relaunch whose config differs from ``run_dir/config.yaml`` (masked, resolved)
    in any key outside :data:`RELAUNCH_KEYS`, unless ``resume`` is ``never``; ``defaults``:
    see :func:`config_diff`."""
    from omegaconf import OmegaConf

    path = run_dir / "config.yaml"
    if resume == "never" or not path.is_file():
        return
    try:
        old = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as e:  # yaml/omegaconf raise many types: name the file instead
        raise ConfigError("output_dir", f"{path} exists but cannot be read ({e})") from None
    assert isinstance(old, dict)
    diff = config_diff(masked(upgrade_saved_config(old)), new, defaults)
    if diff:
        shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise ConfigError(
            "output_dir",
            f"{run_dir} holds a run with another config ({shown}). Relaunch with its values, "
            "pick another name=, or pass resume=never to start over in this folder",
        )
