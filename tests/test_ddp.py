"""DDP on CPU with real gloo processes (tiny random llama, likelihood reward).

What each rank holds and trains on is recorded by ``contraq.training.callbacks.DDPAudit``
(``+ddp_audit_dir``): one JSON line per rank per optimizer step with a digest of the trainable
parameters and of every trajectory the rank trained on. The tests compare those files across
ranks; they do not trust the code under test to check itself.

- per_rank + SubTB, processes started by Lightning itself (``contraq train``);
- rank0 (scatter) + TB + Redis, started by ``scripts/run_ddp.sh`` (torchrun), SIGKILLed
  mid-run and relaunched under the same name: resumes from last.ckpt with the buffer intact.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from contraq import redis_server
from contraq.buffer import RedisBuffer
from contraq.lm.sampling import SampleBatch
from contraq.reward.base import RewardOutput
from contraq.threads import usable_cores
from contraq.training.distributed import check_sampling, pack_rows, slice_reward_output, unpack_rows
from contraq.training.launch import shared_cpu_threads, train_overrides, trainer_kwargs_from_env
from contraq.training.module import step_generator
from redis_fixtures import free_port, require_redis_binary

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "run_ddp.sh"
FACTS, SAMPLES = 1, 3  # per rank per step: tiny slices, distinct across ranks
# The smoke run shrunk: 1 fact x 3 questions of at most 6 tokens per rank and step, fresh
# evaluation only at start and end, no progress bar.
TINY = [
    "experiment=smoke_ddp",
    "~callbacks.progress_bar",
    f"train.facts_per_step={FACTS}",
    f"train.n_samples={SAMPLES}",
    "sampler.max_len=6",
    "eval.every_n_steps=1000",
    "eval.n_facts=1",
    "eval.n_samples=2",
]
LAUNCH_ENV = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK",
    "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
)  # fmt: skip


def clean_env() -> dict[str, str]:
    """This interpreter for the script, one thread per process, no inherited launcher vars."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update(
        PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def run_logged(cmd: list[str], cwd: Path, log: Path, timeout: float = 400) -> None:
    with log.open("w") as out:
        proc = subprocess.run(
            cmd, cwd=cwd, env=clean_env(), stdout=out, stderr=subprocess.STDOUT, timeout=timeout
        )
    if proc.returncode != 0:
        raise AssertionError(f"{cmd[:6]}... exited {proc.returncode}:\n{tail(log)}")


def tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def read_audit(folder: Path) -> dict[int, list[dict[str, Any]]]:
    """rank -> records; a last line cut by SIGKILL is dropped."""
    out = {}
    for path in sorted(folder.glob("rank*.jsonl")):
        records = []
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
        out[int(path.stem.removeprefix("rank"))] = records
    return out


def steps_by_rank(audit: dict[int, list[dict[str, Any]]]) -> dict[int, dict[int, dict]]:
    """step -> rank -> step record, for steps that every rank recorded."""
    table: dict[int, dict[int, dict]] = {}
    for rank, records in audit.items():
        for r in records:
            if r["event"] == "step":
                table.setdefault(r["step"], {})[rank] = r
    return {s: v for s, v in sorted(table.items()) if len(v) == len(audit)}


def assert_in_sync(audit: dict[int, list[dict[str, Any]]], world: int) -> dict[int, dict]:
    """LoRA (+ log Z) bit-identical on every rank after every step, and moving."""
    assert sorted(audit) == list(range(world)), f"audit files of ranks {sorted(audit)}"
    starts = [next(r for r in audit[k] if r["event"] == "start") for k in range(world)]
    assert len({s["params"] for s in starts}) == 1, "ranks start from different weights"
    table = steps_by_rank(audit)
    assert table, "no step recorded by every rank"
    previous = starts[0]["params"]
    for step, recs in table.items():
        digests = {recs[k]["params"] for k in range(world)}
        assert len(digests) == 1, f"step {step}: trainable parameters differ across ranks"
        assert digests != {previous}, f"step {step}: the optimizer step changed nothing"
        previous = digests.pop()
        assert len({recs[k]["replay"] for k in range(world)}) == 1, f"step {step}: coin differs"
    return table


# --------------------------------------------------------------------------------------------
# Pure pieces (no processes)
# --------------------------------------------------------------------------------------------


def test_pack_unpack_round_trip_and_reward_slices() -> None:
    g = torch.Generator().manual_seed(0)
    b, p, t = 5, 4, 6
    batch = SampleBatch(
        prompt_ids=torch.randint(0, 1000, (b, p), generator=g),
        prompt_mask=torch.ones(b, p, dtype=torch.long),
        actions=torch.randint(0, 1000, (b, t), generator=g),
        lengths=torch.tensor([6, 2, 3, 4, 5]),
        log_pf=-torch.rand(b, t, generator=g),
        log_pterm=-torch.rand(b, t, generator=g),
    )
    log_r, prefix = -10 * torch.rand(b, generator=g), -torch.rand(b, t, generator=g)
    longs, floats = pack_rows(batch, log_r, prefix, [7, 7, 3, 3, 9])
    got, got_r, got_prefix, rows = unpack_rows(longs[1:4], floats[1:4], p, t, has_prefix=True)
    for name in ("prompt_ids", "prompt_mask", "actions", "lengths", "log_pf", "log_pterm"):
        assert torch.equal(getattr(got, name), getattr(batch, name)[1:4]), name
    assert torch.equal(got_r, log_r[1:4]) and torch.equal(got_prefix, prefix[1:4])
    assert rows == [7, 3, 3]
    assert unpack_rows(*pack_rows(batch, log_r, None, [0] * b), p, t, has_prefix=False)[2] is None

    out = RewardOutput(
        log_r=log_r,
        components={"log_pq": log_r * 2, "scalar": torch.tensor(1.0)},
        answers=None,
        questions=[f"q{i}?" for i in range(b)],
    )
    part = slice_reward_output(out, 1, 3)
    assert torch.equal(part.log_r, log_r[1:3]) and part.questions == ["q1?", "q2?"]
    assert torch.equal(part.components["log_pq"], 2 * log_r[1:3])
    assert part.components["scalar"].item() == 1.0 and part.answers is None


def test_sampling_mode_and_torchrun_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="train.sampling must be one of"):
        check_sampling("rank_0")
    kwargs = {"devices": "auto", "num_nodes": 1, "accelerator": "cpu"}
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert trainer_kwargs_from_env(kwargs) == kwargs  # not under torchrun: untouched
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert trainer_kwargs_from_env(kwargs) == {**kwargs, "devices": 4, "num_nodes": 2}


# --------------------------------------------------------------------------------------------
# per_rank, SubTB, processes started by Lightning
# --------------------------------------------------------------------------------------------


def test_relaunched_ranks_get_the_demos_training_overrides() -> None:
    """`contraq demo trainer=ddp`: Lightning re-runs the other ranks as `contraq train`, which
    has no `evaluation` group."""
    given = ["trainer=ddp", "evaluation.n=2", "+evaluation.x=1", "evaluation=default", "seed=3"]
    given += ["eval.n_facts=2", "name=evaluation_run"]
    assert train_overrides(given) == ["trainer=ddp", "seed=3", "eval.n_facts=2", given[-1]]


def test_cpu_ranks_share_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two CPU ranks on one machine: each gets cores // 2 threads during fit (children inherit
    OMP_NUM_THREADS), and the old count comes back; a user's OMP_NUM_THREADS is kept."""
    import lightning as L

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    old = torch.get_num_threads()
    two = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    want = max(1, usable_cores() // 2)
    with shared_cpu_threads(two):
        assert os.environ["OMP_NUM_THREADS"] == str(want)
        assert torch.get_num_threads() == want
    assert "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() == old
    one = L.Trainer(accelerator="cpu", devices=1, logger=False)
    with shared_cpu_threads(one):
        assert "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() == old
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    with shared_cpu_threads(two):
        assert os.environ["OMP_NUM_THREADS"] == "7" and torch.get_num_threads() == old


@pytest.mark.distributed
def test_per_rank_subtb_lightning_spawn(tmp_path: Path) -> None:
    steps = 7  # step indices 5 and 6 replay from the buffer (coin of seed 0)
    audit = tmp_path / "audit"
    cmd = [sys.executable, "-m", "contraq.cli", "train", *TINY, "name=pr", "trainer.devices=2"]
    cmd += ["train.sampling=per_rank", "loss=subtb", f"train.max_steps={steps}"]
    cmd += [f"+ddp_audit_dir={audit}"]
    run_logged(cmd, tmp_path, tmp_path / "run.log")

    table = assert_in_sync(read_audit(audit), world=2)
    assert sorted(table) == list(range(1, steps + 1))
    for step, recs in table.items():
        assert len(recs[0]["rows"]) == len(recs[1]["rows"]) == FACTS * SAMPLES
        assert Counter(recs[0]["rows"]) != Counter(recs[1]["rows"]), f"step {step}: same slice"
        assert recs[0]["global_rows"] is None
    assert any(recs[0]["replay"] for recs in table.values()), "no replay step was exercised"
    run = tmp_path / "outputs" / "pr"
    assert json.loads((run / "train_summary.json").read_text())["steps"] == steps
    assert (run / "adapter" / "adapter_config.json").exists()
    # Rank 0 alone writes: one slice per sample-writing step, one fresh eval at start and end.
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert rows and all(n == FACTS * SAMPLES for n in Counter(r["step"] for r in rows).values())
    assert [json.loads(x)["step"] for x in (run / "fresh_eval.jsonl").open()] == [0, steps]


# --------------------------------------------------------------------------------------------
# rank0 scatter + Redis via scripts/run_ddp.sh: kill, relaunch, resume
# --------------------------------------------------------------------------------------------


def worker_pids(marker: str) -> list[int]:
    """Live processes whose command line holds ``marker`` (zombies excluded)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if marker.encode() in (d / "cmdline").read_bytes():
                state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    pids.append(int(d.name))
        except (OSError, IndexError):
            continue
    return pids


def buffer_texts(port: int, namespace: str) -> set[tuple[str, str]]:
    buf = RedisBuffer(port=port, namespace=namespace)
    try:
        keys = buf.keys()  # a method of the buffer, not a dict view
        return {(k, e.text) for k in keys for e in buf.entries(k)}
    finally:
        buf.close()


def first_replay_end(start: int, seed: int = 0, prob: float = 0.5) -> int:
    """Smallest max_steps > start + 2 whose last step index replays (the coin of its plan)."""
    step = start + 2
    while torch.rand((), generator=step_generator(seed, step, 3)).item() >= prob:
        step += 1
    return step + 1


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """run_ddp.sh, 2 CPU processes, rank0 sampling, Redis buffer: SIGKILL to the launcher's
    process group after the checkpoint of step >= 2, then the same command relaunched."""
    require_redis_binary()
    tmp = tmp_path_factory.mktemp("ddp_resume")
    port, redis_dir, name = free_port(), tmp / "redis", "resume"
    run = tmp / "outputs" / name
    common = ["--nproc", "2", "--name", name, *TINY, "train.sampling=rank0"]
    common += [f"buffer.port={port}", f"buffer.data_dir={redis_dir}", "buffer.max_size=1000"]
    common += ["buffer.near_dup_ratio=0", "callbacks.model_checkpoint.every_n_train_steps=2"]
    try:
        # 1) Long run, killed once last.ckpt holds step >= 2 and three steps are recorded.
        audit1 = tmp / "audit1"
        cmd1 = ["bash", str(SCRIPT), *common, "train.max_steps=500", f"+ddp_audit_dir={audit1}"]
        log1 = tmp / "run1.log"
        with log1.open("w") as out:
            proc = subprocess.Popen(
                cmd1, cwd=tmp, env=clean_env(), stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, killed as a whole below
            )  # fmt: skip
        ckpt = run / "checkpoints" / "last.ckpt"
        deadline = time.monotonic() + 300
        while True:
            recorded = read_audit(audit1).get(0, []) if audit1.exists() else []
            if ckpt.exists() and sum(r["event"] == "step" for r in recorded) >= 3:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"first run ended early (rc {proc.poll()}):\n{tail(log1)}")
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        for _ in range(100):  # workers die with their launcher (PR_SET_PDEATHSIG)
            orphans = worker_pids(str(audit1))
            if not orphans:
                break
            time.sleep(0.1)
        killed_step = int(torch.load(ckpt, weights_only=True)["global_step"])
        before = buffer_texts(port, f"contraq:{name}")

        # 2) The same command, continued to a few steps past the checkpoint.
        audit2 = tmp / "audit2"
        steps2 = first_replay_end(killed_step)
        cmd2 = ["bash", str(SCRIPT), *common, f"train.max_steps={steps2}"]
        run_logged([*cmd2, f"+ddp_audit_dir={audit2}"], tmp, tmp / "run2.log")
        yield {
            "run": run,
            "audit1": read_audit(audit1),
            "audit2": read_audit(audit2),
            "killed_step": killed_step,
            "steps2": steps2,
            "orphans": orphans,
            "before": before,
            "after": buffer_texts(port, f"contraq:{name}"),
        }
    finally:
        redis_server.stop(redis_dir)


@pytest.mark.distributed
@pytest.mark.redis
def test_rank0_scatter_gives_each_rank_its_own_slice(resumed_run: dict[str, Any]) -> None:
    for key in ("audit1", "audit2"):
        table = assert_in_sync(resumed_run[key], world=2)
        for step, recs in table.items():
            r0, r1 = recs[0]["rows"], recs[1]["rows"]
            assert len(r0) == len(r1) == FACTS * SAMPLES, f"{key} step {step}"
            # Rank 0 drew both slices; the ranks trained on exactly those, split in two.
            assert Counter(r0) + Counter(r1) == Counter(recs[0]["global_rows"]), f"{key} {step}"
            assert recs[1]["global_rows"] is None
            if not recs[0]["replay"]:
                assert Counter(r0) != Counter(r1), f"{key} step {step}: both ranks, one slice"


@pytest.mark.distributed
@pytest.mark.redis
def test_killed_run_resumes_from_last_ckpt_with_buffer(resumed_run: dict[str, Any]) -> None:
    k = resumed_run["killed_step"]
    assert k >= 2
    assert resumed_run["orphans"] == [], "workers outlived their SIGKILLed launcher"
    # The relaunch starts from the checkpoint's step and weights, not from step 0.
    starts = [r for r in resumed_run["audit2"][0] if r["event"] == "start"]
    assert [s["step"] for s in starts] == [k]
    at_k = [r for r in resumed_run["audit1"][0] if r["event"] == "step" and r["step"] == k]
    assert starts[0]["params"] == at_k[0]["params"], "resumed weights differ from the checkpoint"
    table = steps_by_rank(resumed_run["audit2"])
    assert sorted(table) == list(range(k + 1, resumed_run["steps2"] + 1))
    assert any(recs[0]["replay"] for recs in table.values()), "resumed run never replayed"
    summary = json.loads((resumed_run["run"] / "train_summary.json").read_text())
    assert summary["steps"] == resumed_run["steps2"]
    assert summary["resumed_from"].endswith("checkpoints/last.ckpt")
    # Redis kept every entry of the killed run (no eviction or near-dup merging configured).
    assert resumed_run["before"], "the killed run left no buffer entries"
    assert resumed_run["before"] <= resumed_run["after"]
    assert len(resumed_run["after"]) > len(resumed_run["before"])
    launch = (resumed_run["run"] / "launch.log").read_text()
    assert "resuming from" in launch and "using the Redis on" in launch
