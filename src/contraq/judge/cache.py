"""Where a judge lives: a ``configs/nli`` group's ``path`` (a folder or hub id), else the
trained offline judge at ``<cache>/nli/<train.name>``, written atomically under a file lock."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock

from contraq.errors import UserError
from contraq.files import write_dir_atomically
from contraq.judge.config import NLITrainConfig


def cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    """``cfg[key]`` of a mapping, DictConfig or object, ``default`` when absent."""
    if cfg is None:
        return default
    if isinstance(cfg, Mapping) or hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def is_complete(path: Path) -> bool:
    """Whether ``path`` holds a finished checkpoint (written last: ``metrics.json``)."""
    return (path / "config.json").is_file() and (path / "metrics.json").is_file()


def configured_path(nli_cfg: Any) -> Path | None:
    """The ``path`` of a ``configs/nli`` group (a hub id comes back inside a ``Path``: pass
    ``str(...)`` on), or ``None`` when the group names the trained offline judge."""
    if isinstance(nli_cfg, NLITrainConfig):
        return None
    path = cfg_get(nli_cfg, "path", None)
    if path:
        return Path(path).expanduser()
    if nli_cfg is not None and "train" in nli_cfg and cfg_get(nli_cfg, "train") is None:
        raise ValueError("NLI config: neither 'path' nor a 'train' section is set")
    return None


def judge_path(nli_cfg: Any) -> Path:
    """The judge's checkpoint for reward loading; never trains. UserError naming the expected
    folder when the offline judge has not been trained yet."""
    path = configured_path(nli_cfg)
    if path is not None:
        return path
    out = NLITrainConfig.from_any(nli_cfg).output_dir()
    if not is_complete(out):
        raise UserError(
            f"no trained NLI judge at {out}; run `contraq nli-train` first (or set nli.path)"
        )
    return out


def training_lock(out: Path) -> FileLock:
    """The lock that serialises training into ``out`` across processes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(out.parent / f".{out.name}.lock"))


def save_checkpoint(
    model: Any, tok: Any, metrics: dict[str, Any], out: Path, *, replace: bool
) -> None:
    """Save model, tokenizer and ``metrics.json`` into ``out`` atomically (readers see no
    folder or a complete one); ``replace`` swaps out an existing checkpoint."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    write_dir_atomically(out, write, is_complete, replace=replace)
