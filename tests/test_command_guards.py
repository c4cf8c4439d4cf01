"""Second reliability round (issue 28) for the commands that read a run: `contraq eval`
stops its workers on SIGTERM, bad adapter or checkpoint files are refused in one line, and
bad input is refused before anything is written. Real `contraq` processes, tiny model."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from test_run_folder import REPO, _env, contraq, one_line_error, train


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-step smoke run (adapter/ and checkpoints/ written)."""
    out = tmp_path_factory.mktemp("guards") / "run"
    train(out, "train.max_steps=2")
    return out


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_sigterm_to_eval_stops_its_worker_and_removes_its_temp_folder(
    run: Path, tmp_path: Path
) -> None:
    """Issue 28 case 5: the parent exited 143, its worker kept computing with parent 1 and
    /tmp/contraq-eval-* stayed behind."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    cmd = [sys.executable, "-m", "contraq.cli", "eval", f"checkpoint={run}", "workers=2"]
    cmd += ["device=cpu", "n=16", f"out={tmp_path / 'eval'}", "temperatures=[0.5,0.7,0.9]"]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=_env(TMPDIR=str(tmp)), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline, workers = time.time() + 600, []
    while time.time() < deadline and proc.poll() is None and not workers:
        workers = _children(proc.pid)
        time.sleep(0.2)
    assert workers, "no worker started"
    time.sleep(2)  # the worker is loading or computing
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-2000:]
    one_line_error(stderr, "contraq eval: stopped by SIGTERM")
    deadline = time.time() + 30
    while time.time() < deadline and any(map(_alive, workers)):
        time.sleep(0.2)
    assert not any(map(_alive, workers))
    assert not list(tmp.glob("contraq-eval-*"))


def _sample(run: Path, tmp_path: Path, checkpoint: Path) -> subprocess.CompletedProcess[str]:
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"subject": "Paris", "edit_fact": "Paris is in Italy"}) + "\n")
    out = tmp_path / "q.jsonl"
    args = [f"checkpoint={checkpoint}", f"facts={facts}", f"out={out}", "overwrite=true"]
    return contraq("sample", *args, "n=1", "device=cpu")


def test_bad_adapter_and_checkpoint_files_are_refused_in_one_line(
    run: Path, tmp_path: Path
) -> None:
    """Issue 28 cases 8, 9: a hostile adapter_model.bin, a truncated adapter_model.safetensors,
    a checkpoint of a run with another lora_r and a hostile .ckpt gave tracebacks (or six
    lines); each is one line naming the file, and the pickle never runs."""
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    adapter = copy / "adapter"
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    proc = _sample(run, tmp_path, copy)
    assert proc.returncode == 2, proc.stderr[-2000:]
    one_line_error(proc.stderr, str(adapter), "cannot load the adapter")

    marker = tmp_path / "pwned"
    script = (
        "import os, sys, torch\n"
        "class P:\n"
        "    def __reduce__(self): return (os.system, (f'touch {sys.argv[2]}',))\n"
        "torch.save({'x': P()}, sys.argv[1])\n"
    )
    weights.unlink()
    subprocess.run(
        [sys.executable, "-c", script, str(adapter / "adapter_model.bin"), str(marker)], check=True
    )
    evil_ckpt = copy / "checkpoints" / "evil.ckpt"
    subprocess.run([sys.executable, "-c", script, str(evil_ckpt), str(marker)], check=True)
    for checkpoint, needle in ((copy, "cannot load the adapter"), (evil_ckpt, "weights_only=True")):
        proc = _sample(run, tmp_path, checkpoint)
        assert proc.returncode == 2, proc.stderr[-2000:]
        one_line_error(proc.stderr, str(checkpoint), needle)
    assert not marker.exists()

    # The run's own checkpoint read with a config whose model.lora_r differs.
    config = OmegaConf.load(copy / "config.yaml")
    config.model.lora_r = int(config.model.lora_r) * 2
    OmegaConf.save(config, copy / "config.yaml")
    proc = _sample(run, tmp_path, copy / "checkpoints" / "last.ckpt")
    assert proc.returncode == 2, proc.stderr[-2000:]
    one_line_error(proc.stderr, "last.ckpt", "LoRA weights do not match", "lora_r")


def test_eval_with_a_bad_facts_file_creates_no_out_folder(run: Path, tmp_path: Path) -> None:
    """Issue 28 case 9: `contraq eval` created `out` before it read the facts file."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    out = tmp_path / "eval"
    proc = contraq("eval", f"checkpoint={run}", f"facts={bad}", f"out={out}", "device=cpu")
    assert proc.returncode == 2, proc.stderr[-2000:]
    one_line_error(proc.stderr, f"{bad}:1")
    assert not out.exists()


def test_a_run_name_stays_one_folder_inside_outputs(tmp_path: Path) -> None:
    """Issue 28 cases 8, 9: `name=../../x` wrote outside outputs/ (Hydra creates the run
    folder before the job starts) and a 300-character name gave a traceback."""
    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    for name, needle in (("../../x", "one folder name"), ("n" * 300, "at most 200 bytes")):
        proc = subprocess.run(
            [sys.executable, "-m", "contraq.cli", "train", "experiment=smoke", f"name={name}"],
            cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr[-2000:]
        one_line_error(proc.stdout + proc.stderr, "contraq train: name: must be", needle)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b"]


def test_sample_and_eval_refuse_a_key_they_do_not_read(run: Path, tmp_path: Path) -> None:
    """Issue 28: `contraq sample +temprature=0.5` sampled at T=1 and wrote its file; train and
    demo already refused such a `+key`. Refused in one line before any file is read."""
    out = tmp_path / "q.jsonl"
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"subject": "Paris", "edit_fact": "Paris is in Italy."}) + "\n")
    for cmd, args, key in (
        ("sample", [f"facts={facts}", f"out={out}", "n=1", "+temprature=0.5"], "temprature"),
        ("sample", [f"facts={facts}", f"out={out}", "n=1", "++seeds=3"], "seeds"),
        ("eval", [f"facts={tmp_path / 'absent.jsonl'}", "+evaluation.n=2"], "evaluation.n"),
    ):
        proc = contraq(cmd, f"checkpoint={run}", "device=cpu", *args)
        assert proc.returncode == 2, proc.stderr[-2000:]
        one_line_error(proc.stderr, f"contraq {cmd}: {key}: no part of contraq reads this key")
        assert not out.exists() and not (run / "eval").exists()


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux's read-only /sys")
def test_an_output_dir_the_machine_refuses_is_one_line(tmp_path: Path) -> None:
    """A run folder where nothing may be written (here under /sys, which refuses even root):
    one line naming the folder, exit 2, no traceback (was Hydra's PermissionError)."""
    proc = contraq("train", "experiment=smoke", "name=ro", "output_dir=/sys/contraq-ro")
    assert proc.returncode == 2, proc.stderr[-2000:]
    one_line_error(proc.stderr, "cannot write /sys/contraq-ro", "not permitted")


def test_a_full_disk_or_a_read_only_folder_is_named_other_os_errors_keep_their_traceback() -> None:
    import errno

    from contraq.cli import os_error_line

    full = OSError(errno.ENOSPC, "No space left on device", "/runs/x/checkpoints/last.ckpt")
    assert os_error_line(full) == (
        "cannot write /runs/x/checkpoints/last.ckpt: the disk is full: free some space and "
        "relaunch (the last checkpoint is kept)"
    )
    assert "read-only" in (os_error_line(OSError(errno.EROFS, "Read-only", "/mnt/ro")) or "")
    assert "a file" in (os_error_line(OSError(errno.EACCES, "Permission denied")) or "")
    assert os_error_line(OSError(errno.EBADF, "Bad file descriptor")) is None
