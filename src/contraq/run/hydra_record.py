"""Hydra's record of a run (``.hydra/config.yaml``, ``hydra.yaml``, ``overrides.yaml``),
written into the run folder only once the run's config is accepted.

Hydra writes these files before the job starts, so a launch refused for a bad value or a
differing config replaced the record of what was trained (issue 28). ``contraq train`` turns
Hydra's own writing off (:func:`defer`) and writes the same files, secrets masked, where
``config.yaml`` is written (:func:`write`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from contraq.config.checks import masked

DEFAULT_SUBDIR = ".hydra"  # configs/train.yaml's hydra.output_subdir
_pending: dict[str, str | None] = {"subdir": None}


def defer(overrides: list[str]) -> list[str]:
    """``overrides`` with Hydra's record turned off; the folder it would have used (the last
    ``hydra.output_subdir=`` given, else :data:`DEFAULT_SUBDIR`) is kept for :func:`write`."""
    subdir: str | None = DEFAULT_SUBDIR
    for override in overrides:
        key, _, value = override.partition("=")
        if key.lstrip("+") == "hydra.output_subdir":
            subdir = None if value.strip() in ("", "null") else value.strip()
    _pending["subdir"] = subdir
    return [*overrides, "hydra.output_subdir=null"]


def write(task_cfg: Any) -> Path | None:
    """Write the record Hydra would have written for this job (passwords masked) and return
    its folder; None outside ``hydra.main`` or when no record is wanted."""
    from hydra.core.hydra_config import HydraConfig

    from contraq.run.folder import atomic_write

    subdir = _pending["subdir"]
    if subdir is None or not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    folder = Path(hydra_cfg.runtime.output_dir) / subdir
    own = OmegaConf.to_container(hydra_cfg, resolve=False)
    assert isinstance(own, dict)
    own["output_subdir"] = subdir  # where the record went, as Hydra's own writing says
    nodes = {
        "config.yaml": task_cfg,
        "hydra.yaml": {"hydra": own},
        "overrides.yaml": hydra_cfg.overrides.task,
    }
    for name, node in nodes.items():
        plain = OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node
        text = OmegaConf.to_yaml(OmegaConf.create(masked(plain)))
        atomic_write(folder / name, lambda fh, t=text: fh.write(t.encode()))
    return folder
