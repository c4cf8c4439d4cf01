"""A user's run folder survives relaunches, kills and bad input (issue 9), through the real
`contraq` command on the tiny model: metrics of every launch kept, config written only after
validation, differing relaunches refused, checkpoints verified, secrets masked, one line per
user error, SIGINT/SIGTERM save last.ckpt."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import smoke_train_cmd
from redis_fixtures import start_server

REPO = Path(__file__).resolve().parents[1]


def _cmd(out: Path, *overrides: str) -> list[str]:
    return smoke_train_cmd(out, "eval.every_n_steps=1000", "eval.n_samples=2", *overrides)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("CONTRAQ_DEBUG", None)
    env.update(extra)
    return env


def contraq(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "contraq.cli", *args],
        cwd=REPO,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def train(out: Path, *overrides: str, env: dict[str, str] | None = None, rc: int = 0) -> str:
    proc = subprocess.run(
        _cmd(out, *overrides),
        cwd=REPO,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == rc, proc.stderr[-3000:]
    return proc.stdout + proc.stderr  # Hydra sends log records to stdout


def one_line_error(stderr: str, *needles: str) -> None:
    """A user error: exactly one line that names what is wrong, no traceback."""
    lines = [ln for ln in stderr.splitlines() if ln.startswith("contraq ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


def metric_rows(out: Path) -> list[dict[str, str]]:
    with (out / "logs" / "metrics.csv").open(newline="") as fh:
        return [{k: v for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]


def loss_steps(out: Path) -> list[int]:
    return [int(r["step"]) for r in metric_rows(out) if "train/loss" in r]


def summary(out: Path) -> dict:
    return json.loads((out / "train_summary.json").read_text())


def test_relaunches_keep_metrics_config_and_checkpoints(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(out, "train.max_steps=2")
    first = metric_rows(out)
    assert loss_steps(out) == [0, 1]

    # Case 1: a longer relaunch resumes and appends; relaunching the finished run keeps all.
    train(out, "train.max_steps=4")
    assert loss_steps(out) == [0, 1, 2, 3]
    assert all(row in metric_rows(out) for row in first)
    train(out, "train.max_steps=4")
    assert loss_steps(out) == [0, 1, 2, 3]
    assert contraq("report", f"run={out}").returncode == 0

    # Case 2: relaunches that fail validation or differ leave config.yaml as it was.
    config = (out / "config.yaml").read_bytes()
    one_line_error(train(out, "train.max_steps=4", "train.lr=abc", rc=2), "train.lr", "'abc'")
    stderr = train(out, "train.max_steps=4", "model.termination_token='\"???abc\"'", rc=2)
    one_line_error(stderr, "model.termination_token", "???abc")
    one_line_error(train(out, "train.max_steps=4", "train.lr=1e-3", rc=2), "train.lr: 0.0002")
    assert (out / "config.yaml").read_bytes() == config

    # Cases 3 and 6: a planted pickle as last.ckpt never runs, even with torch told to allow
    # it; the relaunch resumes from the intact step checkpoint.
    marker = tmp_path / "pwned"
    script = (
        "import pathlib, sys, torch\n"
        "class P:\n"
        "    def __reduce__(self): return (pathlib.Path.touch, (pathlib.Path(sys.argv[2]),))\n"
        "torch.save({'global_step': 9, 'x': P()}, sys.argv[1])\n"
    )
    last = out / "checkpoints" / "last.ckpt"
    subprocess.run([sys.executable, "-c", script, str(last), str(marker)], check=True)
    stderr = train(out, "train.max_steps=6", env=_env(TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1"))
    assert not marker.exists()
    assert "last.ckpt is unusable" in stderr and "weights_only=True" in stderr
    assert summary(out)["resumed_from"].endswith("step=4.ckpt") and summary(out)["steps"] == 6
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a truncated last.ckpt
    train(out, "train.max_steps=7")
    assert summary(out)["resumed_from"].endswith("step=6.ckpt") and summary(out)["steps"] == 7
    assert loss_steps(out) == [0, 1, 2, 3, 4, 5, 6]

    # Case 5: `contraq sample` takes the minimal {subject, edit_fact} schema it documents.
    facts = tmp_path / "minimal.jsonl"
    facts.write_text(json.dumps({"subject": "Paris", "edit_fact": "Paris is in Italy"}) + "\n")
    q = tmp_path / "q.jsonl"
    args = ["sample", f"checkpoint={out}", "n=2", f"out={q}", "device=cpu"]
    proc = contraq(*args, f"facts={facts}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert q.read_text().count("\n") >= 1

    # Case 8: a megabyte prompt is refused at load time, naming file:line.
    huge = tmp_path / "huge.jsonl"
    huge.write_text(json.dumps({"subject": "X", "edit_fact": "X is Y", "prompt": "a" * 2**20}))
    started = time.time()
    proc = contraq(*args, "overwrite=true", f"facts={huge}")  # q.jsonl exists from case 5
    assert proc.returncode == 2 and time.time() - started < 60
    one_line_error(proc.stderr, f"{huge}:1: prompt", "characters")


def test_differing_relaunch_with_resume_never_keeps_the_previous_config(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(out, "train.max_steps=1")
    old = (out / "config.yaml").read_text()
    train(out, "train.max_steps=1", "train.lr=1e-3", "resume=never")
    assert (out / "config.prev-1.yaml").read_text() == old
    assert "lr: 0.001" in (out / "config.yaml").read_text()
    assert summary(out)["resumed_from"] is None


def test_run_folder_with_the_old_flat_callbacks_keys_relaunches(tmp_path: Path) -> None:
    """config.yaml written before the callbacks became `_target_` nodes still loads and resumes."""
    out = tmp_path / "run"
    train(out, "train.max_steps=2")
    saved = OmegaConf.load(out / "config.yaml")
    saved.callbacks = {
        "checkpoint_every_n_steps": 2,
        "keep_step_checkpoints": 1,
        "samples_every_n_steps": 1,
        "progress_bar": "none",
    }
    OmegaConf.save(saved, out / "config.yaml")
    train(out, "train.max_steps=3")
    assert summary(out)["resumed_from"].endswith("last.ckpt") and summary(out)["steps"] == 3
    assert "every_n_train_steps: 2" in (out / "config.yaml").read_text()  # today's layout
    one_line_error(train(out, "train.max_steps=3", "train.lr=1e-3", rc=2), "train.lr: 0.0002")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.n_samples=0", "train.n_samples"),
        ("train.n_samples=-1", "train.n_samples"),
        ("train.lr=abc", "train.lr"),
        ("sampler.min_len=9", "sampler.min_len"),
        ("buffer.backend=disk", "buffer.backend"),
        ("train.replay.prob=often", "train.replay.prob"),  # wrong type: caught by the schema
    ],
)
def test_bad_config_values_get_one_line_naming_the_key(
    tmp_path: Path, override: str, key: str
) -> None:
    out = tmp_path / "run"
    one_line_error(train(out, override, rc=2), f"contraq train: {key}: must be")
    assert not (out / "config.yaml").exists()


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.lrr=1", "train.lrr: Key 'lrr' not in 'TrainConfig'"),
        (
            "reward.reward_temp_start=2",
            "reward.reward_temp_start: moved to train.reward_temp.start",
        ),
        ("loss=nope", "loss: no option 'nope' (one of: subtb, tb, vargrad)"),
        (
            "callbacks.checkpoint_every_n_steps=5",
            "callbacks.checkpoint_every_n_steps: moved to callbacks.model_checkpoint.",
        ),
    ],
)
def test_unknown_keys_and_options_get_one_line(tmp_path: Path, override: str, needle: str) -> None:
    out = tmp_path / "run"
    one_line_error(train(out, override, rc=2), f"contraq train: {needle}")
    assert not (out / "config.yaml").exists()


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    proc = contraq("--debug", "train", "experiment=smoke", f"output_dir={tmp_path}", "train.lr=x")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_empty_validation_split_trains_without_val_metrics(tmp_path: Path) -> None:
    facts = tmp_path / "facts.jsonl"
    rows = [
        {
            "prompt": f"The capital of land {i} is",
            "subject": f"land {i}",
            "original_answer": "A",
            "edited_answer": "B",
            "edit_fact": f"The capital of land {i} is B",
            "original_fact": f"The capital of land {i} is A",
        }
        for i in range(3)
    ]
    facts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    stderr = train(
        out, f"data.path={facts}", "data.val_fraction=0.0", "data.test_fraction=0.0",
        "train.max_steps=1",
    )  # fmt: skip
    assert "validation split" in stderr and summary(out)["steps"] == 1


def test_redis_password_never_reaches_the_run_folder(tmp_path: Path) -> None:
    secret = "s3cret-pass-9"
    info = start_server(tmp_path / "redis", password=secret)
    from contraq import redis_server

    try:
        out = tmp_path / "run"
        train(
            out, "buffer=redis", f"buffer.port={info.port}", "buffer.autostart=false",
            "train.max_steps=1", env=_env(CONTRAQ_REDIS_PASSWORD=secret),
        )  # fmt: skip
    finally:
        redis_server.stop(info.data_dir)
    assert "password: '***'" in (out / "config.yaml").read_text()
    for path in out.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_last_checkpoint_and_exits_cleanly(tmp_path: Path, sig: int) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen(
        _cmd(out, "train.max_steps=1000", "callbacks.model_checkpoint.every_n_train_steps=1000"),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    samples = out / "samples.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if samples.exists() and samples.read_text().count("\n") >= 8:  # two steps done
            break
        time.sleep(0.2)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, stderr[-3000:]
    one_line_error(stderr, f"stopped by {signal.Signals(sig).name}", "last.ckpt")
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert 2 <= ckpt["global_step"] < 1000
    assert summary(out)["stopped_by"] == signal.Signals(sig).name
    train(out, f"train.max_steps={ckpt['global_step'] + 1}")
    assert summary(out)["resumed_from"].endswith("last.ckpt")
    assert summary(out)["steps"] == ckpt["global_step"] + 1


def test_a_second_training_in_the_same_folder_is_refused(tmp_path: Path) -> None:
    """Two processes training one folder would write the same checkpoints, adapter and logs
    twice (seen when a run was relaunched while its first process was still training)."""
    from filelock import FileLock

    out = tmp_path / "busy"
    out.mkdir()
    with FileLock(str(out / ".train.lock")):  # what a running `contraq train` holds
        text = train(out, "train.max_steps=1", rc=2)
    assert "another `contraq train` is training in this folder" in text
    assert not (out / "config.yaml").exists() and not (out / "checkpoints").exists()
    train(out, "train.max_steps=1")  # once it is free, the folder trains as usual
    assert (out / "checkpoints" / "last.ckpt").is_file()
