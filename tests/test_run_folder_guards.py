"""Second reliability round (issue 28) on the real `contraq train` with the tiny model: a
restart with resume=never is never resumed into the old run, no secret typed on the command
line reaches a file, a refused launch leaves the run's files as they were, a `+` typo is
refused."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from test_run_folder import contraq, loss_steps, one_line_error, summary, train


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


def test_sample_never_replaces_a_file_it_did_not_write(tmp_path: Path) -> None:
    """Issue 28 cases 2 and 8: out= the facts file, the run's config.yaml, an existing file or a
    folder is refused in one line before any sampling; overwrite=true replaces a plain file."""
    run = tmp_path / "run"
    train(run, "train.max_steps=1")
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"subject": "Paris", "edit_fact": "Paris is in Italy"}) + "\n")
    mine = tmp_path / "mine.jsonl"
    mine.write_text("my own notes\n")
    protected = {p: p.read_bytes() for p in (facts, run / "config.yaml", mine)}
    args = ["sample", f"checkpoint={run}", f"facts={facts}", "n=2", "device=cpu"]
    refused = [
        (f"out={facts}", "input of this command"),
        (f"out={run / 'config.yaml'}", "belongs to the run folder"),
        (f"out={run / 'config.yaml'} overwrite=true", "belongs to the run folder"),
        (f"out={mine}", "exists; pass overwrite=true"),
        (f"out={tmp_path}", "is a folder"),
    ]
    for given, needle in refused:
        proc = contraq(*args, *given.split())
        assert proc.returncode == 2, (given, proc.stderr[-2000:])
        one_line_error(proc.stderr, "contraq sample: out:", needle)
        assert "questions for" not in proc.stdout  # refused before sampling
    assert {p: p.read_bytes() for p in protected} == protected
    proc = contraq(*args, f"out={mine}", "overwrite=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [json.loads(x)["subject"] for x in mine.read_text().splitlines()] == ["Paris"] * 2
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_password_on_the_command_line_is_refused_before_any_file(tmp_path: Path) -> None:
    """Issue 28 case 3: `buffer.password=X` was masked in config.yaml but saved in plain text
    in .hydra/config.yaml, overrides.yaml and hydra.yaml."""
    secret = "s3cret-cli-7"
    out = tmp_path / "run"
    for given in (f"buffer.password={secret}", f"+buffer.password='{secret}'"):
        stderr = train(out, "buffer=redis", "buffer.autostart=false", given, rc=2)
        one_line_error(stderr, "buffer.password", "CONTRAQ_REDIS_PASSWORD")
        assert secret not in stderr
    assert not out.exists()
    proc = contraq("eval", f"checkpoint={out}", f"+nli.password={secret}")
    assert proc.returncode == 2
    one_line_error(proc.stderr, "nli.password", "CONTRAQ_REDIS_PASSWORD")


def test_a_refused_launch_leaves_the_hydra_record_as_it_was(tmp_path: Path) -> None:
    """Issue 28 case 6: a launch refused for a bad value or a differing config rewrote
    .hydra/overrides.yaml (it then said train.lr=-1, which was never trained)."""
    out = tmp_path / "run"
    train(out, "train.max_steps=1")
    record = {p.name: p.read_bytes() for p in (out / ".hydra").iterdir()}
    assert set(record) == {"config.yaml", "hydra.yaml", "overrides.yaml"}
    assert b"train.max_steps=1" in record["overrides.yaml"]
    one_line_error(train(out, "train.max_steps=2", "train.lr=-1", rc=2), "train.lr")
    one_line_error(train(out, "train.max_steps=2", "train.lr=0.001", rc=2), "train.lr: 0.0002")
    assert {p.name: p.read_bytes() for p in (out / ".hydra").iterdir()} == record
    train(out, "train.max_steps=2")  # an accepted relaunch records its command line
    assert b"train.max_steps=2" in (out / ".hydra" / "overrides.yaml").read_bytes()


def test_an_added_key_that_nothing_reads_is_refused(tmp_path: Path) -> None:
    """Issue 28 case 7: `+trian.lr=0.5` trained at the default lr and saved `trian:`."""
    out = tmp_path / "run"
    for given, key in (
        ("+trian.lr=0.5", "trian.lr"),
        ("+train.lrr=0.5", "train.lrr"),
        ("++train.lrr=0.5", "train.lrr"),
        ("+trainer.max_stepz=3", "trainer.max_stepz"),
    ):
        one_line_error(train(out, given, rc=2), f"contraq train: {key}: no part of contraq reads")
    assert not out.exists()
    # Keys a reader takes: a Lightning Trainer argument, a key read when present.
    train(
        out, "train.max_steps=1", "+trainer.limit_train_batches=1.0", f"+ddp_audit_dir={tmp_path}/a"
    )
    assert summary(out)["steps"] == 1 and list((tmp_path / "a").iterdir())


def test_a_second_ctrl_c_aborts_in_one_line(tmp_path: Path) -> None:
    """Issue 28 case 8: a second SIGINT during the clean stop exited 1 with Lightning's
    text; it exits 130 with one line saying the running step was not saved."""
    import signal
    import subprocess
    import time

    from test_run_folder import REPO, _cmd, _env

    out = tmp_path / "run"
    proc = subprocess.Popen(
        _cmd(out, "train.max_steps=1000", "callbacks.model_checkpoint.every_n_train_steps=1000"),
        cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    samples = out / "samples.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if samples.exists() and samples.read_text().count("\n") >= 8:  # two steps done
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)  # within the running step
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-3000:]
    one_line_error(stderr, "contraq train: aborted by a second SIGINT", "not saved")


def test_a_full_disk_stops_before_a_checkpoint_with_the_last_ones_intact(tmp_path: Path) -> None:
    """Issue 28: a write that failed for want of space left adapter/ at step 25 and last.ckpt
    at 20. The adapter now follows last.ckpt (at the end too), and a checkpoint with its
    adapter is written only when the disk has room (here a margin no disk has)."""
    out = tmp_path / "run"
    train(out, "train.max_steps=3")  # checkpoints every 2 steps: the end is saved too
    last = out / "checkpoints" / "last.ckpt"
    assert _step(last) == 3
    kept = {p: p.read_bytes() for p in [last, *(out / "adapter").iterdir()]}
    text = train(out, "train.max_steps=6", "callbacks.adapter_checkpoint.free_margin_mb=1e12", rc=2)
    one_line_error(text, "contraq train: ", f"{out / 'checkpoints'}: ", "bytes needed", " free;")
    assert {p: p.read_bytes() for p in kept} == kept
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".adapter")) == []
