"""Checks of a run config before anything is loaded or written, and the run folder's config.

- :func:`validate` checks every value the code reads, once, up front: a bad value raises
  :class:`ConfigError` naming the key and what it accepts (the CLI prints that one line).
- :func:`masked` hides secrets (``*password*``) so the saved ``config.yaml`` never holds them.
- :func:`one_line_errors` turns Hydra's composition errors (a value of the wrong type or an
  unknown key of the structured config, :mod:`contraq.config.schema`) into the same one-line error.
- :func:`config_diff` lists the keys in which a relaunch differs from the run folder's config;
  :func:`check_relaunch` refuses such a relaunch (unless ``resume=never``).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import string
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from contraq.config.upgrade import MOVED_KEYS, upgrade_saved_config
from contraq.errors import ConfigError as ConfigError  # re-exported: its readers import it here

MASK = "***"
# Keys that may change when a run is relaunched in its own folder: how long it runs and the
# bookkeeping (checkpoint/sample frequency, progress bar, the DDP audit folder). Everything
# else shapes what was trained, so a change is refused.
RELAUNCH_KEYS = frozenset({"resume", "train.max_steps", "trainer.max_steps", "ddp_audit_dir"})
RELAUNCH_PREFIXES = ("callbacks.",)
SOURCES = ("smollm2", "hub", "local", "gguf", "tiny")
TEMPLATE_KEYS = ("subject", "edit_fact", "prompt")


Check = Callable[[Any], str | None]  # None when the value is fine, else what is expected


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def integer(lo: int | None = None, hi: int | None = None) -> Check:
    def check(v: Any) -> str | None:
        ok = _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi)
        if ok:
            return None
        rng = f" in [{lo}, {hi}]" if lo is not None and hi is not None else ""
        rng = rng or (f" >= {lo}" if lo is not None else "")
        return f"an integer{rng}"

    return check


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Check:
    def check(v: Any) -> str | None:
        ok = _is_num(v) and (lo is None or (v > lo if lo_open else v >= lo))
        ok = ok and (hi is None or v <= hi)
        if ok:
            return None
        left = "(" if lo_open else "["
        if lo is not None and hi is not None:
            return f"a number in {left}{lo}, {hi}]"
        if lo is not None:
            return f"a number {'>' if lo_open else '>='} {lo}"
        return "a finite number"

    return check


def choice(*allowed: Any) -> Check:
    def check(v: Any) -> str | None:
        return None if v in allowed else "one of " + ", ".join(repr(a) for a in allowed)

    return check


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def text(v: Any) -> str | None:
    return None if isinstance(v, str) and v.strip() else "a non-empty string"


def optional(inner: Check) -> Check:
    def check(v: Any) -> str | None:
        if v is None:
            return None
        expected = inner(v)
        return expected and f"null or {expected}"

    return check


def template(v: Any) -> str | None:
    if not isinstance(v, str) or not v.strip():
        return "a non-empty template string"
    try:
        keys = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
    except ValueError as e:
        return f"a valid format string ({e})"
    if keys - set(TEMPLATE_KEYS):
        return "a template using only {subject}, {edit_fact} and {prompt}"
    return None


def string_list(v: Any) -> str | None:
    ok = isinstance(v, list | tuple) and all(isinstance(s, str) for s in v)
    return None if ok else "a list of strings"


def run_name(v: Any) -> str | None:
    """``name`` names the folder ``outputs/<name>`` (and the Redis namespace): one folder
    name, so that the run stays inside ``outputs/`` and the folder can be created."""
    if not isinstance(v, str) or not v.strip():
        return "a non-empty string"
    if v in (".", "..") or any(c in v for c in "/\\\0"):
        return "one folder name (no '/', '\\' or '..'): the run folder is outputs/<name>"
    if len(v.encode()) > 200:
        return "a folder name of at most 200 bytes"
    return None


# Every key the training code reads, with what it accepts. A key that is absent from the
# config (an older run folder, a reduced test config) is not checked.
RULES: dict[str, Check] = {
    "name": run_name,
    "output_dir": text,
    "seed": integer(0),
    "prompt.template": template,
    "prompt.raw_template": template,
    "prompt.use_chat_template": choice("auto", True, False),
    "train.max_steps": integer(1),
    "train.facts_per_step": integer(1),
    "train.n_samples": integer(1),
    "train.lr": number(0, lo_open=True),
    "train.logz_lr": number(0, lo_open=True),
    "train.weight_decay": number(0),
    "train.lr_warmup_steps": integer(0),
    "train.grad_clip": optional(number(0)),
    "train.pf_temp_prob": number(0, 1),
    "train.pf_temp_low": number(0, lo_open=True),
    "train.pf_temp_high": number(0, lo_open=True),
    "train.sampling": choice("per_rank", "rank0", "rank0_broadcast"),
    "train.draw": choice("iid", "distinct"),
    "train.base_prob": number(0, 1),
    "train.replay.prob": number(0, 1),
    "train.replay.prioritized": boolean,
    "train.reward_temp.start": number(0, lo_open=True),
    "train.reward_temp.end": number(0, lo_open=True),
    "train.reward_temp.horizon": integer(1),
    "eval.n_facts": integer(0),
    "eval.n_samples": integer(1),
    "eval.every_n_steps": integer(1),
    "eval.diversity": boolean,
    "sampler.min_len": integer(0),
    "sampler.max_len": integer(1),
    "sampler.top_k": integer(0),
    "sampler.top_p": number(0, 1, lo_open=True),
    "sampler.ban_penalty": number(0, lo_open=True),
    "sampler.extra_banned_tokens": string_list,
    "loss.name": choice("tb", "subtb", "vargrad"),
    "loss.subtb_lambda": number(0, lo_open=True),
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
    "data.path": text,
    "data.val_fraction": number(0, 1),
    "data.test_fraction": number(0, 1),
    "data.split_seed": integer(0),
    "data.max_fact_chars": integer(1),
    "model.source": choice(*SOURCES),
    "model.dtype": choice("float32", "bfloat16", "float16", "auto"),
    "model.termination_token": text,
    "model.lora_r": integer(1),
    "model.lora_alpha": number(0, lo_open=True),
    "nli.batch_size": integer(1),
    "nli.max_length": integer(1),
    "trainer.max_steps": integer(1),
}


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
    if _is_int(lo) and _is_int(hi) and lo >= hi:
        yield ConfigError("sampler.min_len", f"must be < sampler.max_len ({hi}), got {lo}")
    lo, hi = get("train.pf_temp_low"), get("train.pf_temp_high")
    if _is_num(lo) and _is_num(hi) and lo > hi:
        yield ConfigError("train.pf_temp_low", f"must be <= train.pf_temp_high ({hi}), got {lo}")
    v, t = get("data.val_fraction"), get("data.test_fraction")
    if _is_num(v) and _is_num(t) and (v >= 1 or t >= 1 or v + t >= 1):
        yield ConfigError(
            "data.val_fraction",
            f"data.val_fraction + data.test_fraction must be < 1 (else no training facts), "
            f"got {v} + {t}",
        )
    source, path = get("model.source"), get("model.name_or_path")
    if source in ("hub", "local", "gguf") and not path:
        yield ConfigError(
            "model.name_or_path",
            f"must be set for model.source={source} (a hub id, a folder or a file)",
        )
    if get("loss.name") == "vargrad" and _is_int(n := get("train.n_samples")) and n < 2:
        yield ConfigError(
            "train.n_samples",
            f"must be >= 2 for loss=vargrad (it compares the questions of a fact), got {n}",
        )
    for key in ("reward.w_div", "reward.w_share"):
        w = get(key)
        if get("loss.name") == "subtb" and _is_num(w) and w != 0:
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
    for key, check in RULES.items():
        present, value = _get(cfg, key)
        if not present:
            continue
        expected = check(value)
        if expected:
            raise ConfigError(key, f"must be {expected}, got {value!r}")
    for err in _cross_checks(cfg):
        raise err


def composition_error(exc: BaseException) -> ConfigError:
    """One :class:`ConfigError` for a Hydra/OmegaConf composition error, naming the key.

    A key with a rule in :data:`RULES` gets the rule's message (``train.lr: must be a number
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
    value = getattr(cause, "value", None)
    if str(key) in MOVED_KEYS:  # an override in an older layout
        return ConfigError(str(key), f"moved to {MOVED_KEYS[str(key)]}")
    if str(key) == "callbacks.progress_bar" and isinstance(value, str):
        return ConfigError(
            str(key),
            "is a callback node: callbacks/progress_bar=rich|tqdm, none: ~callbacks.progress_bar",
        )
    rule = RULES.get(str(key))
    expected = rule(value) if rule is not None and value is not None else None
    if expected:
        return ConfigError(str(key), f"must be {expected}, got {value!r}")
    return ConfigError(str(key), (str(cause).splitlines() or ["invalid"])[0])


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
