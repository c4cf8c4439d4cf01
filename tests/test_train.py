"""End-to-end training on the tiny model: runs, checkpoints, survives SIGKILL, resumes exactly."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import smoke_train_cmd

REPO = Path(__file__).resolve().parents[1]


def _train_cmd(out: Path, *overrides: str) -> list[str]:
    return smoke_train_cmd(
        out, "train.max_steps=6", "eval.every_n_steps=3", "train.replay.prob=0.5", *overrides
    )


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _run(out: Path, *overrides: str) -> None:
    proc = subprocess.run(
        _train_cmd(out, *overrides),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_smoke_training_kill_and_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    # Reference: an uninterrupted run.
    ref = tmp_path / "ref"
    _run(ref)
    ref_ckpt = _ckpt(ref / "checkpoints" / "last.ckpt")
    assert ref_ckpt["global_step"] == 6
    assert (ref / "adapter" / "adapter_model.safetensors").exists()
    assert (ref / "logs" / "metrics.csv").exists()
    rows = [json.loads(line) for line in (ref / "samples.jsonl").read_text().splitlines()]
    assert rows and {"question", "log_r", "log_pq", "step"} <= set(rows[0])
    fresh = [json.loads(line) for line in (ref / "fresh_eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in fresh] == [0, 3, 6]
    # Only trainable weights (LoRA + log Z head) are checkpointed, not the base LM.
    assert ref_ckpt["state_dict"] and all(
        ("lora_" in k or "log_z_head" in k) for k in ref_ckpt["state_dict"]
    )

    # The same run, SIGKILLed once a checkpoint exists, then relaunched with the same folder.
    run = tmp_path / "run"
    proc = subprocess.Popen(
        _train_cmd(run),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)  # let the write finish
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _ckpt(last)
    assert killed_at["global_step"] < 6, "the run finished before it could be killed"
    saved_buffer = json.loads(killed_at["contraq_buffer"])

    _run(run)
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["resumed_from"].endswith("last.ckpt")
    resumed = _ckpt(last)
    assert resumed["global_step"] == 6
    assert sum(len(v) for v in saved_buffer["entries"].values()) > 0, (
        "the checkpoint holds the buffer"
    )
    # Deterministic continuation: identical weights, optimizer moments and buffer.
    for k, v in ref_ckpt["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][k], v, rtol=0, atol=1e-6)
    assert json.loads(resumed["contraq_buffer"]) == json.loads(ref_ckpt["contraq_buffer"])
    ref_adapter = load_file(str(ref / "adapter" / "adapter_model.safetensors"))
    run_adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    for k, v in ref_adapter.items():
        torch.testing.assert_close(run_adapter[k], v, rtol=0, atol=1e-6)


def test_resume_never_starts_over(tmp_path: Path) -> None:
    out = tmp_path / "r"
    _run(out, "train.max_steps=2", "eval.every_n_steps=100")
    _run(out, "train.max_steps=2", "eval.every_n_steps=100", "resume=never")
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["resumed_from"] is None and summary["steps"] == 2


@pytest.mark.parametrize("loss", ["subtb", "vargrad"])
def test_other_losses_train(tmp_path: Path, loss: str) -> None:
    out = tmp_path / loss
    # replay 0.5: step 1 replays (the TB pin below), so VarGrad also sees a replayed batch
    _run(
        out, f"loss={loss}", "train.max_steps=2", "eval.every_n_steps=100", "train.replay.prob=0.5"
    )
    ckpt = _ckpt(out / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2
    losses = _losses(out)
    assert len(losses) == 2 and all(math.isfinite(loss) for _, loss, _ in losses)
    assert len(seconds := _step_seconds(out)) == 2 and all(s > 0 for s in seconds)


def _step_rows(out: Path) -> list[dict[str, str]]:
    """The metrics.csv rows of every logged training step."""
    import csv

    with (out / "logs" / "metrics.csv").open() as f:
        return [r for r in csv.DictReader(f) if r.get("train/loss")]


def _losses(out: Path) -> list[tuple[int, float, float]]:
    """(step, train/loss, train/replay) of every logged training step."""
    rows = _step_rows(out)
    return [(int(r["step"]), float(r["train/loss"]), float(r["train/replay"])) for r in rows]


def _step_seconds(out: Path) -> list[float]:
    """train/step_seconds of every logged training step (contraq.training.callbacks.StepTimer)."""
    return [float(r["train/step_seconds"]) for r in _step_rows(out)]


# Recorded on the code before the config refactor of issue 10: the same seed must give the
# same losses (TB with a reward-temperature schedule and prioritized replay; SubTB with uniform
# replay), so moving config keys changed no behaviour. Exploration up to T=2, the default then;
# float32 sampling, the only one then (train.sample_weights=shared).
PINNED = {  # case: (overrides, train/loss per step, steps that replayed)
    "tb": (
        [
            "train.max_steps=6",
            "train.pf_temp_high=2.0",
            "train.replay.prob=0.5",
            "train.reward_temp.start=2.0",
            "train.reward_temp.end=1.0",
            "train.reward_temp.horizon=4",
        ],
        # Re-recorded when the loss pass was packed (contraq.lm.packing): log P_F is the
        # padded pass's to 1e-6, but Adam's first step on the log Z head's zero-initialised
        # last layer is lr * sign(grad), so rounding moves log Z at step 1 by 0.02. The padded
        # pass still gives the values before it: 0.0695, 35.821, 179.84, 540.48, 1452.4, 1183.8.
        [0.06946060061454773, 35.58293151855469, 179.3065948486328, 539.5519409179688]
        + [1450.9256591796875, 1182.46142578125],
        [5],
    ),
    "subtb": (
        [
            "train.max_steps=5",
            "train.pf_temp_high=2.0",
            "loss=subtb",
            "loss.subtb_lambda=0.9",
            "train.replay.prob=0.8",
            "train.replay.prioritized=false",
        ],
        [36.39920425415039, 35.89351272583008, 36.47785949707031, 35.74863815307617]
        + [35.869258880615234],
        [4],
    ),
}


@pytest.mark.parametrize("case", sorted(PINNED))
def test_fixed_seed_losses_are_pinned(tmp_path: Path, case: str) -> None:
    overrides, losses, replayed = PINNED[case]
    out = tmp_path / case
    # the case's overrides win over _train_cmd's
    _run(out, "eval.n_facts=0", "train.sample_weights=shared", *overrides)
    got = _losses(out)
    assert [s for s, _, _ in got] == list(range(len(losses)))
    assert [s for s, _, r in got if r == 1.0] == replayed
    # rel 1e-4, not 1e-5: since a step runs each distinct prompt once (contraq.lm.forward), the
    # log-probs come from a KV-cached pass that rounds differently (about 3e-5 here).
    assert [loss for _, loss, _ in got] == pytest.approx(losses, rel=1e-4)
