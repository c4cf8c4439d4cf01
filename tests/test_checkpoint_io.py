"""Checkpoint files (issue 9, cases 3 and 6): atomic saves on the destination's filesystem,
verification before resuming, and loads that never run code."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from contraq.config.checks import ConfigError
from contraq.run.folder import (
    AtomicCheckpointIO,
    checkpoint_problem,
    find_resume_checkpoint,
    load_checkpoint_file,
)

SHM = Path("/dev/shm")


def _ckpt(step: int, mb: int = 0) -> dict:
    return {
        "global_step": step,
        "state_dict": {"w": torch.full((mb * 2**18 or 4,), float(step))},
        "loops": {},
        "optimizer_states": [],
    }


WRITER = textwrap.dedent(
    """
    import sys, torch
    from contraq.run.folder import AtomicCheckpointIO
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
    io = AtomicCheckpointIO() if sys.argv[2] == "atomic" else TorchCheckpointIO()
    big = {"global_step": 99, "state_dict": {"w": torch.ones(160 * 2**18)},
           "loops": {}, "optimizer_states": []}
    for _ in range(1000):  # keep rewriting until killed
        io.save_checkpoint(big, sys.argv[1])
    """
)


def kill_during_write(dest: Path, kind: str) -> None:
    """Start a process that rewrites ``dest`` (160 MB) with TMPDIR on /dev/shm, SIGKILL it
    while the destination folder shows a write in progress."""
    before = dest.stat()
    env = dict(os.environ, TMPDIR=str(SHM), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(dest), kind], env=env)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            st = dest.stat()
            changed = (st.st_size, st.st_mtime_ns, st.st_ino) != (
                before.st_size,
                before.st_mtime_ns,
                before.st_ino,
            )
            temps = [p for p in dest.parent.glob(".*.tmp") if p.stat().st_size > 0]
            if (changed and st.st_size < 160 * 2**20) or temps:
                break
            time.sleep(0.001)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.mark.skipif(not SHM.is_dir(), reason="needs /dev/shm (another filesystem than tmp_path)")
def test_kill_during_a_save_leaves_the_previous_checkpoint_intact(tmp_path: Path) -> None:
    assert os.stat(SHM).st_dev != os.stat(tmp_path).st_dev
    dest = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(_ckpt(7), dest)
    for _ in range(3):
        kill_during_write(dest, "atomic")
        assert checkpoint_problem(dest) is None
        assert load_checkpoint_file(dest)["global_step"] in (7, 99)


@pytest.mark.skipif(not SHM.is_dir(), reason="needs /dev/shm (another filesystem than tmp_path)")
def test_lightning_default_io_is_what_truncated_checkpoints(tmp_path: Path) -> None:
    # The control: the same kill against Lightning's own TorchCheckpointIO (which stages the
    # bytes in $TMPDIR and copies them across filesystems) leaves a broken file.
    dest = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(_ckpt(7), dest)
    for _ in range(5):
        kill_during_write(dest, "lightning")
        if checkpoint_problem(dest) is not None:
            return
    pytest.skip("the kill never hit Lightning's copy window on this machine")


class Planted:
    """Unpickling this runs code: the test checks that it never does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_planted_pickle_never_runs_even_when_torch_is_told_to_allow_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    torch.save({**_ckpt(5), "payload": Planted(marker)}, ckpts / "last.ckpt")
    AtomicCheckpointIO().save_checkpoint(_ckpt(4), ckpts / "step=4.ckpt")
    assert "weights_only=True" in (checkpoint_problem(ckpts / "last.ckpt") or "")
    with pytest.raises(Exception, match="[Ww]eights.only|Unsupported global"):
        AtomicCheckpointIO().load_checkpoint(ckpts / "last.ckpt")
    chosen = find_resume_checkpoint("auto", ckpts, Path)
    assert chosen == str(ckpts / "step=4.ckpt")
    assert not marker.exists()


def test_resume_falls_back_to_the_newest_intact_step_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpts = tmp_path / "checkpoints"
    io = AtomicCheckpointIO()
    for step in (2, 4, 6):
        io.save_checkpoint(_ckpt(step), ckpts / f"step={step}.ckpt")
    assert find_resume_checkpoint("never", ckpts, Path) is None
    (ckpts / "step=6.ckpt").write_bytes((ckpts / "step=6.ckpt").read_bytes()[:300])  # truncated
    for content in (b"", b"PK\x03\x04 truncated zip"):
        (ckpts / "last.ckpt").write_bytes(content)
        with caplog.at_level("WARNING"):
            assert find_resume_checkpoint("auto", ckpts, Path) == str(ckpts / "step=4.ckpt")
        assert "last.ckpt is unusable" in caplog.text and "step=6.ckpt is unusable" in caplog.text
        caplog.clear()
    io.save_checkpoint(_ckpt(8), ckpts / "last.ckpt")
    assert find_resume_checkpoint("auto", ckpts, Path) == str(ckpts / "last.ckpt")
    assert find_resume_checkpoint("auto", tmp_path / "none", Path) is None
    for p in ckpts.iterdir():
        p.write_bytes(b"")
    with pytest.raises(ConfigError, match="resume: no intact checkpoint"):
        find_resume_checkpoint("auto", ckpts, Path)
    with pytest.raises(ConfigError, match="resume: .*empty file"):
        find_resume_checkpoint(str(ckpts / "last.ckpt"), ckpts, Path)


def test_resume_takes_the_highest_step_of_last_and_its_versions(tmp_path: Path) -> None:
    """Lightning writes `last-v1.ckpt` beside a `last.ckpt` it did not write (a copied run
    folder, continued): the stale `last.ckpt` must not win."""
    ckpts = tmp_path / "checkpoints"
    io = AtomicCheckpointIO()
    io.save_checkpoint(_ckpt(160), ckpts / "last.ckpt")
    io.save_checkpoint(_ckpt(160), ckpts / "step=160.ckpt")
    assert find_resume_checkpoint("auto", ckpts, Path) == str(ckpts / "last.ckpt")  # a tie
    io.save_checkpoint(_ckpt(190), ckpts / "step=190.ckpt")
    io.save_checkpoint(_ckpt(200), ckpts / "last-v1.ckpt")
    assert find_resume_checkpoint("auto", ckpts, Path) == str(ckpts / "last-v1.ckpt")
    (ckpts / "last-v1.ckpt").write_bytes(b"")  # broken: the newest intact step file
    assert find_resume_checkpoint("auto", ckpts, Path) == str(ckpts / "step=190.ckpt")
