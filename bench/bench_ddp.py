"""Samples learned per second with 1 vs N CPU processes (DDP, gloo) in rank-0 sampling.

Each configuration is a real run of ``scripts/run_ddp.sh`` (torchrun) on the tiny random
llama (or ``--model smollm2``) with the likelihood reward, fixed-length questions
(min_len = max_len, no tempering, no replay: every step costs the same) and an audit
(``+ddp_audit_dir``) that records, per rank and step, the time and the trajectories trained on.

- ``rank0_broadcast``: the seed's design; rank 0 samples one slice and every rank trains on that
  same slice (N processes, one process's worth of learning): the baseline.
- ``rank0``: rank 0 samples N slices in one batch and scatters one to each rank.
- ``per_rank`` (with ``--per-rank``): every rank samples and scores its own slice.

"Samples learned" per step = distinct trajectories across ranks (a multiset union of the row
digests: the broadcast design counts its one shared slice once). Step time = median gap
between rank 0's step records after ``--warmup`` steps.

Usage: python bench/bench_ddp.py [--nproc 2] [--steps 12] [--warmup 3] [--per-rank]
                                [--threads 1] [--model tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "run_ddp.sh"


def run_config(
    workdir: Path, nproc: int, mode: str, args: argparse.Namespace
) -> dict[str, float | int | str]:
    name = f"bench-{mode}-{nproc}"
    audit = workdir / f"audit-{name}"
    overrides = [
        "experiment=smoke_ddp",
        f"model={args.model}",
        "buffer=memory",
        "train.replay.prob=0",
        "train.pf_temp_prob=0",
        f"train.sampling={mode}",
        f"train.max_steps={args.steps}",
        f"train.facts_per_step={args.facts}",
        f"train.n_samples={args.samples}",
        f"sampler.min_len={args.length}",
        f"sampler.max_len={args.length}",
        "~callbacks.progress_bar",
        "callbacks.model_checkpoint.every_n_train_steps=100000",
        "callbacks.sample_writer.every_n_steps=100000",
        "eval.every_n_steps=100000",
        "eval.n_facts=1",
        "eval.n_samples=1",
        "resume=never",
        f"+ddp_audit_dir={audit}",
    ]
    env = dict(os.environ)
    env.setdefault("PYTHON", sys.executable)
    # run_ddp.sh keeps a preset OMP_NUM_THREADS; 0 lets it use cores / processes.
    env.pop("OMP_NUM_THREADS", None)
    if args.threads > 0:
        env["OMP_NUM_THREADS"] = str(args.threads)
    log = workdir / f"{name}.log"
    started = time.time()
    with log.open("w") as out:
        rc = subprocess.run(
            ["bash", str(SCRIPT), "--nproc", str(nproc), "--name", name, *overrides],
            cwd=workdir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        ).returncode
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"{name}: run_ddp.sh exited {rc}\n{tail}")
    per_rank = {}
    for path in audit.glob("rank*.jsonl"):
        recs = [json.loads(x) for x in path.read_text().splitlines()]
        per_rank[int(path.stem[4:])] = {r["step"]: r for r in recs if r["event"] == "step"}
    steps = sorted(per_rank[0])[args.warmup :]
    times = [per_rank[0][s]["time"] for s in steps]
    step_s = statistics.median(b - a for a, b in zip(times, times[1:], strict=False))
    learned = []
    for s in steps:
        union: Counter[str] = Counter()
        for rank in per_rank.values():
            union |= Counter(rank[s]["rows"])
        learned.append(sum(union.values()))
    per_step = statistics.median(learned)
    return {
        "nproc": nproc,
        "mode": mode,
        "step_s": step_s,
        "learned_per_step": per_step,
        "samples_per_s": per_step / step_s,
        "wall_s": time.time() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="processes of the DDP runs")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of timing")
    parser.add_argument("--facts", type=int, default=2, help="edit facts per rank and step")
    parser.add_argument("--samples", type=int, default=4, help="questions per fact")
    parser.add_argument("--length", type=int, default=8, help="tokens per question (fixed)")
    parser.add_argument("--model", default="tiny", help="model config (tiny | smollm2 | ...)")
    parser.add_argument("--per-rank", action="store_true", help="also time train.sampling=per_rank")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="OMP threads per process (default 1: on a busy machine more threads than free "
        "cores make OpenMP spin; 0: run_ddp.sh's cores / processes)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the run folders")
    args = parser.parse_args()
    if args.steps - args.warmup < 3:
        parser.error("need at least 3 timed steps (--steps - --warmup)")

    configs = [(1, "rank0"), (args.nproc, "rank0_broadcast"), (args.nproc, "rank0")]
    if args.per_rank:
        configs.append((args.nproc, "per_rank"))
    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="bench_ddp_"))
    results = [run_config(workdir, n, mode, args) for n, mode in configs]
    load_after = os.getloadavg()

    print(
        f"model={args.model}, {args.facts} facts x {args.samples} questions of {args.length} "
        f"tokens per rank and step, {args.steps - args.warmup} timed steps; "
        f"OMP threads/process: {args.threads or 'cores/procs'}; "
        f"{os.cpu_count()} CPU cores; load average before {load_before[0]:.2f}/"
        f"{load_before[1]:.2f}, after {load_after[0]:.2f}/{load_after[1]:.2f} (1/5 min)"
    )
    print(f"{'procs':>5} {'sampling':<16} {'s/step':>8} {'learned/step':>12} {'samples/s':>10}")
    for r in results:
        print(
            f"{r['nproc']:>5} {r['mode']:<16} {r['step_s']:>8.3f} "
            f"{r['learned_per_step']:>12.0f} {r['samples_per_s']:>10.2f}"
        )
    by = {(r["nproc"], r["mode"]): float(r["samples_per_s"]) for r in results}
    one = by[(1, "rank0")]
    bcast, scatter = by[(args.nproc, "rank0_broadcast")], by[(args.nproc, "rank0")]
    print(f"scatter / broadcast ({args.nproc} procs): {scatter / bcast:.2f}x")
    print(f"broadcast {args.nproc} procs / 1 proc: {bcast / one:.2f}x")
    print(f"scatter {args.nproc} procs / 1 proc: {scatter / one:.2f}x")
    if args.per_rank:
        print(f"per_rank {args.nproc} procs / 1 proc: {by[(args.nproc, 'per_rank')] / one:.2f}x")
    if args.keep:
        print(f"runs kept in {workdir}")
    else:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
