"""Files on disk: where the repository and the cache folder are (relative paths in configs are
read from the current folder, else from the repository root of an editable install), and how a
folder of weights is written so that concurrent readers never see half of it."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from contraq.errors import ConfigError

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


def check_output_file(
    out: Path, overwrite: bool, reads: Sequence[Path] = (), owned: Sequence[Path] = ()
) -> None:
    """Refuse ``out=`` before any work starts: a folder, a file the command reads (``reads``),
    an existing file inside a folder another command owns (``owned``: a run folder), an
    existing file without ``overwrite=true``, or a folder this process cannot write in.

    Raises:
        ConfigError: naming ``out`` and what to do instead.
    """
    target = out.expanduser().resolve()
    if target.is_dir():
        raise ConfigError("out", f"{out} is a folder; give a file path")
    if any(target == p.expanduser().resolve() for p in reads):
        raise ConfigError("out", f"{out} is an input of this command; choose another out=")
    for folder in owned:
        if target.exists() and target.is_relative_to(folder.resolve()):
            raise ConfigError(
                "out", f"{out} belongs to the run folder {folder}; choose another out="
            )
    if target.exists() and not overwrite:
        raise ConfigError(
            "out", f"{out} exists; pass overwrite=true to replace it, or another out="
        )
    parent = next(p for p in target.parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError("out", f"cannot write in {parent} (not a writable folder)")


def write_output_file(out: Path, data: bytes, overwrite: bool) -> None:
    """Write ``data`` to ``out`` through a temp file beside it: readers see no file or the whole
    one. Without ``overwrite`` a file that appeared meanwhile (another command writing the same
    ``out=``) is kept and :class:`ConfigError` raised; ``os.link`` never replaces a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, out)
        else:
            os.link(tmp, out)
    except FileExistsError:
        raise ConfigError(
            "out", f"{out} was written by another process meanwhile; kept it, wrote nothing"
        ) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


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
