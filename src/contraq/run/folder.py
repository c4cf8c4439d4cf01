"""What keeps a run folder safe: nothing the user cannot regenerate is lost or overwritten.

- :class:`AtomicCheckpointIO`: checkpoints are written to a temp file in the destination folder,
  fsynced and renamed over the old file (Lightning's own save stages the bytes through fsspec
  in ``$TMPDIR`` and copies them when that is another filesystem: a kill during the copy
  leaves a truncated ``last.ckpt``). Every load uses ``weights_only=True`` explicitly, which
  ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` cannot override.
- :func:`find_resume_checkpoint`: verifies ``last.ckpt`` and falls back to the newest intact
  ``step=N.ckpt`` with a warning.
- :class:`AppendingCSVLogger`: ``logs/metrics.csv`` keeps the rows of earlier launches.
- :func:`write_run_config`: the run's ``config.yaml`` (secrets masked), written atomically.
- :func:`set_aside_checkpoints`: a ``resume=never`` restart moves the old ``checkpoints/`` to
  ``checkpoints.prev-N/`` (kept, and never resumed by a later relaunch).
- :func:`training_lock`: one training process per run folder (a relaunch while the first is
  still training would write the same checkpoints and logs twice).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from contraq.errors import ConfigError, UserError

log = logging.getLogger(__name__)

STEP_CKPT = re.compile(r"^step=(\d+)\.ckpt$")
# Keys every Lightning training checkpoint has; a file without them cannot resume a run.
CKPT_KEYS = ("global_step", "state_dict", "loops", "optimizer_states")


# ------------------------------------------------------------------------------ atomic files


def _fsync_dir(folder: Path) -> None:
    """Persist a rename: the directory entry is data too (no-op where dirs cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Call ``write(binary file)`` on a temp file beside ``path``, fsync, then rename it over
    ``path``: readers and a later launch see the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def remove_stale_temp_files(folder: Path) -> int:
    """Delete the temp files that a killed :func:`atomic_write` left in ``folder``."""
    n = 0
    for tmp in folder.glob(".*.tmp") if folder.is_dir() else ():
        with contextlib.suppress(OSError):
            tmp.unlink()
            n += 1
    return n


def load_checkpoint_file(path: str | os.PathLike[str], map_location: Any = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True`` passed explicitly: tensors and plain data
    only, never code, whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says."""
    return torch.load(path, map_location=map_location, weights_only=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint plugin with atomic same-folder saves and safe loads."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_write(Path(path), lambda fh: torch.save(checkpoint, fh))

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        return load_checkpoint_file(path, map_location or (lambda storage, loc: storage))


# ------------------------------------------------------------------------------ resuming


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot resume a run (empty, truncated, not loadable without running
    code, not a training checkpoint), or None when it is intact."""
    return _inspect(path)[0]


def _inspect(path: Path) -> tuple[str | None, int]:
    """:func:`checkpoint_problem` and the checkpoint's ``global_step`` (-1 when unusable)."""
    try:
        if path.stat().st_size == 0:
            return "empty file", -1
        ckpt = load_checkpoint_file(path)
    except Exception as e:  # torch raises many types for a bad file: report, never execute
        first = (str(e).strip().splitlines() or [""])[0][:160]
        return f"unreadable with weights_only=True ({type(e).__name__}: {first})", -1
    if not isinstance(ckpt, Mapping):
        return f"holds a {type(ckpt).__name__}, not a training checkpoint", -1
    missing = [k for k in CKPT_KEYS if k not in ckpt]
    if missing:
        return f"not a training checkpoint (no {', '.join(missing)})", -1
    return None, int(ckpt["global_step"])


def step_checkpoints(folder: Path) -> list[Path]:
    """``step=N.ckpt`` files of ``folder``, newest step first."""
    found = [
        (int(m.group(1)), p) for p in folder.glob("step=*.ckpt") if (m := STEP_CKPT.match(p.name))
    ]
    return [p for _, p in sorted(found, reverse=True)]


def find_resume_checkpoint(
    resume: Any, ckpt_dir: Path, resolve: Callable[[str], Path]
) -> str | None:
    """The checkpoint to resume from (``resume``: ``auto``, ``never`` or a path).

    ``auto``: of ``last.ckpt``, its versions ``last-vN.ckpt`` and the newest intact
    ``step=N.ckpt``, the intact one with the highest global step (``last.ckpt`` on a tie), with
    a warning naming any broken file; None when there is no checkpoint at all. (Lightning writes
    ``last-v1.ckpt`` beside a ``last.ckpt`` it did not write itself, e.g. in a copied run
    folder: that old ``last.ckpt`` must not win.) A named path must be intact. Raises
    :class:`ConfigError` when checkpoints exist but none is usable.
    """
    if resume == "never":
        return None
    if resume not in (None, "auto"):
        path = resolve(str(resume))
        problem = "no such file" if not path.is_file() else checkpoint_problem(path)
        if problem:
            raise ConfigError("resume", f"{path}: {problem}")
        return str(path)
    lasts = sorted(ckpt_dir.glob("last*.ckpt"), key=lambda p: (p.name != "last.ckpt", p.name))
    broken: list[str] = []
    intact: list[tuple[int, Path]] = []

    def check(cand: Path) -> bool:
        problem, step = _inspect(cand)
        if problem is None:
            intact.append((step, cand))
        else:
            broken.append(f"{cand} is unusable ({problem})")
        return problem is None

    for cand in lasts:
        check(cand)
    for cand in step_checkpoints(ckpt_dir):  # newest first: the first intact one is enough
        if check(cand):
            break
    if intact:
        best = max(intact, key=lambda sc: sc[0])[1]  # max keeps the first of equal steps
        if broken:
            log.warning("resuming from %s instead: %s", best, "; ".join(broken))
        return str(best)
    if broken:
        raise ConfigError(
            "resume",
            f"no intact checkpoint in {ckpt_dir}: {'; '.join(broken)}. Pass resume=never to "
            "start over in this folder, or resume=PATH",
        )
    return None


# ------------------------------------------------------------------------------ metrics


class AppendingWriter(ExperimentWriter):
    """CSVLogger's writer that appends to an existing ``metrics.csv`` instead of deleting it
    (Lightning deletes it when the folder exists, so a relaunch lost the earlier rows)."""

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with path.open(newline="") as fh:
            header = next(csv.reader(fh), [])
        self.metrics_keys = list(header)
        if header != sorted(header):  # appends use the sorted key order: align the file first
            self.metrics_keys.sort()
            self._rewrite_with_new_header(self.metrics_keys)


class AppendingCSVLogger(CSVLogger):
    """``lightning.pytorch.loggers.CSVLogger`` whose ``metrics.csv`` survives relaunches."""

    @property
    def experiment(self) -> AppendingWriter:  # type: ignore[override]
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingWriter(log_dir=self.log_dir)
        return self._experiment  # type: ignore[return-value]


# ------------------------------------------------------------------------------ config file


def write_run_config(run_dir: Path, yaml_text: str, keep_previous: bool) -> None:
    """Write ``run_dir/config.yaml`` atomically. With ``keep_previous`` (a ``resume=never``
    restart) a different config already there is kept as ``config.prev-N.yaml``: it
    describes the earlier rows of ``logs/metrics.csv``."""
    path = run_dir / "config.yaml"
    if keep_previous and path.is_file() and path.read_text() != yaml_text:
        dest = _next_free(run_dir, "config", ".yaml")
        os.replace(path, dest)
        log.warning("kept the previous config of %s as %s", run_dir, dest.name)
    atomic_write(path, lambda fh: fh.write(yaml_text.encode()))


def _next_free(run_dir: Path, stem: str, suffix: str = "") -> Path:
    """``run_dir/<stem>.prev-N<suffix>`` for the first N that does not exist yet."""
    n = 1
    while (run_dir / f"{stem}.prev-{n}{suffix}").exists():
        n += 1
    return run_dir / f"{stem}.prev-{n}{suffix}"


def set_aside_checkpoints(ckpt_dir: Path) -> Path | None:
    """Move ``ckpt_dir`` (a ``resume=never`` restart's old checkpoints) to
    ``checkpoints.prev-N`` beside it. Left in place, the old run's ``last.ckpt`` (at a higher
    step) would beat the new run's ``last-v1.ckpt`` when the folder is relaunched. Returns the
    new path, or None when there was nothing to move."""
    if not ckpt_dir.is_dir() or not any(ckpt_dir.iterdir()):
        return None
    dest = _next_free(ckpt_dir.parent, ckpt_dir.name)
    os.replace(ckpt_dir, dest)
    _fsync_dir(ckpt_dir.parent)
    log.warning("resume=never: kept the previous checkpoints of %s as %s", ckpt_dir.parent, dest)
    return dest


class RunBusyError(UserError):
    """Another process is training in the run folder."""


@contextlib.contextmanager
def training_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir/.train.lock`` while training (rank 0 only; released when the process
    ends, also when it is killed: the OS drops the lock with the file descriptor).

    Raises:
        RunBusyError: another process holds it.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir / ".train.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RunBusyError(
            f"{run_dir}: another `contraq train` is training in this folder; wait for it or "
            "stop it (Ctrl+C saves last.ckpt), or use another name="
        ) from None
    try:
        yield
    finally:
        lock.release()
