"""Files on disk: where the repository and the cache folder are (relative paths in configs are
read from the current folder, else from the repository root of an editable install), and how a
folder of weights is written so that concurrent readers never see half of it."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# src/contraq/files.py -> parents[2]
REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as given when absolute or present in the current folder, else under
    :data:`REPO_ROOT`."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p


def default_cache_dir() -> str:
    """``$CONTRAQ_CACHE`` or ``~/.cache/contraq``: converted and trained weights."""
    return os.environ.get("CONTRAQ_CACHE") or str(Path.home() / ".cache" / "contraq")


def write_dir_atomically(
    target: Path,
    write: Callable[[Path], None],
    complete: Callable[[Path], bool],
    *,
    replace: bool = False,
) -> Path:
    """Fill a folder at ``target`` with ``write(tmp)`` on a temporary sibling, then rename it
    into place (atomic on one filesystem): a concurrent reader sees no folder or a complete one.

    ``replace=True`` moves an existing ``target`` aside first (deleted once the new one is in
    place). Otherwise, when another process got there first (``complete(target)``), its folder
    is kept and ours is dropped.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        old = None
        if replace and target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, old / target.name)
        try:
            os.rename(tmp, target)  # fails if target is a non-empty folder
        except OSError:
            if not complete(target):  # not a lost race: a real error
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def jsonl_or_gz(path: str | os.PathLike[str]) -> Path:
    """``path`` itself, or ``path.gz`` when only that exists (committed records are gzipped)."""
    plain = Path(path)
    packed = plain.with_name(plain.name + ".gz")
    return packed if not plain.exists() and packed.is_file() else plain


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` of each non-blank line of a JSON Lines file; when ``path`` is
    absent, its gzipped ``path.gz`` is read instead (:func:`jsonl_or_gz`).

    Raises:
        ValueError: a line that is not JSON or not an object, naming ``file:line``.
    """
    path = jsonl_or_gz(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for lineno, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict):
                raise ValueError(
                    f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}"
                )
            yield lineno, obj
