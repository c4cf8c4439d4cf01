"""What a config key accepts, and the one wording of its error.

Each config group's dataclass declares its keys (type and default) and, next to them, a
``CHECKS`` class variable mapping a field to one of the checks below; its ``__post_init__``
calls :func:`check_fields`. ``KEY`` says where the group sits in the run config (``train``,
``train.replay``) so that a :class:`ConfigError` names the full dotted key.
:mod:`contraq.config.checks` reuses the same checks for the keys of open groups and for
Hydra's composition errors, so every message reads ``<key>: must be <expected>, got <value>``.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from contraq.errors import ConfigError

Check = Callable[[Any], str | None]  # None when the value is fine, else what is expected
TEMPLATE_KEYS = ("subject", "edit_fact", "prompt")


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    return (is_int(v) or isinstance(v, float)) and math.isfinite(v)


def integer(lo: int | None = None, hi: int | None = None) -> Check:
    def check(v: Any) -> str | None:
        ok = is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi)
        if ok:
            return None
        rng = f" in [{lo}, {hi}]" if lo is not None and hi is not None else ""
        rng = rng or (f" >= {lo}" if lo is not None else "")
        return f"an integer{rng}"

    return check


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Check:
    def check(v: Any) -> str | None:
        ok = is_num(v) and (lo is None or (v > lo if lo_open else v >= lo))
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


def problem(key: str, check: Check, value: Any) -> ConfigError | None:
    """The error of ``value`` at ``key`` under ``check``, or None when it passes."""
    expected = check(value)
    return ConfigError(key, f"must be {expected}, got {value!r}") if expected else None


def _unresolved(v: Any) -> bool:
    """An interpolation or ``???`` still in a schema default: checked once it is resolved."""
    return isinstance(v, str) and (v == "???" or v.startswith("${"))


def field_errors(schema: Any, values: Mapping[str, Any]) -> Iterator[ConfigError]:
    """The errors of ``values`` (field -> value) under ``schema.CHECKS``, in its order;
    absent fields are not checked."""
    prefix = f"{schema.KEY}." if schema.KEY else ""
    for name, check in schema.CHECKS.items():
        if name in values and not _unresolved(values[name]):
            err = problem(prefix + name, check, values[name])
            if err is not None:
                yield err


def check_fields(obj: Any) -> None:
    """``__post_init__`` of a config dataclass: raise the first failing check of its fields.

    Raises:
        ConfigError: naming the full dotted key (``train.replay.prob``) and what it accepts.
    """
    for err in field_errors(type(obj), vars(obj)):
        raise err


def rules_of(schemas: Any) -> dict[str, Check]:
    """Full dotted key -> check of every field of ``schemas`` (config dataclasses)."""
    return {
        (f"{s.KEY}.{name}" if s.KEY else name): check
        for s in schemas
        for name, check in s.CHECKS.items()
    }
