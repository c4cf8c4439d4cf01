"""Settings of a command from its composed Hydra config, typed by a dataclass.

Defaults live only in ``configs/`` (one YAML per command or group); the dataclasses here say
types and ranges. A bad value raises :class:`contraq.config.checks.ConfigError` naming the key,
so the CLI prints one line.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from contraq.errors import ConfigError

T = TypeVar("T")


def typed(schema: type[T], node: Any, prefix: str = "") -> T:
    """The keys of dataclass ``schema`` read from config ``node`` (interpolations resolved),
    converted and checked by OmegaConf, then by the dataclass's ``__post_init__``.

    Args:
        prefix: how the user spells ``node``'s path (``"evaluation."``), for messages.

    Raises:
        ConfigError: a key is missing (``???``), of the wrong type or out of range.
    """
    try:
        values = OmegaConf.to_container(node, resolve=True)
        assert isinstance(values, dict)
        picked = {f.name: values[f.name] for f in fields(schema) if f.name in values}
        merged = OmegaConf.merge(OmegaConf.structured(schema), picked)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except MissingMandatoryValue as e:
        key = f"{prefix}{e.full_key}"
        raise ConfigError(key, f"missing; give {key}=...") from None
    except OmegaConfBaseException as e:
        first = (str(e).splitlines() or [""])[0]
        raise ConfigError(f"{prefix}{e.full_key}", first) from None
    except ConfigError as e:
        if prefix and not e.key.startswith(prefix):
            raise ConfigError(f"{prefix}{e.key}", str(e)[len(e.key) + 2 :]) from None
        raise
