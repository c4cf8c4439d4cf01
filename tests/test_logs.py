"""What `contraq train` prints into a non-TTY log (CI, `tee`): each line once, no library
chatter, and still a progress line."""

from __future__ import annotations

import os
import subprocess
from collections import Counter
from pathlib import Path

from conftest import smoke_train_cmd

REPO = Path(__file__).resolve().parents[1]


def _train_log(out: Path) -> str:
    """stdout and stderr, interleaved, of a 2-step smoke run with its progress bar."""
    cmd = [
        a
        for a in smoke_train_cmd(out, "train.max_steps=2", "eval.n_samples=2")
        if a != "~callbacks.progress_bar"
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("CONTRAQ_DEBUG", None)
    done = subprocess.run(
        cmd,
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    return done.stdout


def _message(line: str) -> str:
    """A log line without its prefix: Hydra's ``[time][name][LEVEL] - `` or ``LEVEL: ``."""
    if "] - " in line:
        return line.split("] - ", 1)[1]
    return line.split(": ", 1)[1] if line.startswith(("INFO: ", "WARNING: ")) else line


def test_smoke_train_log_is_clean(tmp_path: Path) -> None:
    log = _train_log(tmp_path / "run")
    lines = [x for x in log.splitlines() if x.strip()]
    twice = [m for m, n in Counter(_message(x) for x in lines).items() if n > 1]
    assert not twice, f"lines printed more than once: {twice}\n{log}"
    assert sum("GPU available" in x for x in lines) == 1, log  # Lightning's, once
    for noise in (
        "litlogger",  # Lightning's advertisement
        "load report",  # transformers' table when a model loads
        "loading weights",  # transformers' progress bar when a model loads
        "is_gradient_checkpointing",  # peft reading transformers' deprecated property
        "leafspec",  # torch's deprecation, raised inside Lightning
        "module(s) in eval mode",  # the policy left in eval mode at fit start
        "futurewarning",
    ):
        assert noise not in log.lower(), f"{noise!r} in the log:\n{log}"
    assert "\n\n\n" not in log, log  # no runs of blank lines
    assert any("2/2" in x for x in lines), f"no progress line:\n{log}"
