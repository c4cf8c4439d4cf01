"""The evaluation's methods and their records: which methods an eval runs (``EvalConfig``),
each method's scored questions (:mod:`contraq.evaluation.baselines`), in this process or split over
several worker processes on a CPU.

Why workers: one decode step of a small LM on a few rows gains little from a second thread,
so on a 2-core machine two processes of one thread each, each with half of the methods, finish
sooner than one process with two threads. A worker is ``python -m contraq.evaluation.methods
SPEC.json``: it loads the run itself, writes its records as JSON Lines and exits (plain JSON
both ways, no pickle). Every method starts from a generator seeded with ``seed``, so the split
does not change which questions a method draws (beyond float rounding with another thread
count, which can flip a rare near-tie token).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from contraq.config.checks import ConfigError
from contraq.data import DEFAULT_MAX_CHARS, EditFact, load_facts
from contraq.evaluation.baselines import beam_records, policy_records
from contraq.evaluation.question_file import file_records, load_questions
from contraq.evaluation.questions import progress_bar, sample_distinct_records
from contraq.files import iter_jsonl
from contraq.procs import die_with_parent, sigterm_unwinds
from contraq.run.load import (
    SPLITS,
    RunRef,
    heldout_facts,
    load_parts,
    pick_device,
    resolve_run,
)
from contraq.run.parts import Parts, build_prompts
from contraq.threads import torch_threads, usable_cores


@dataclass(frozen=True)
class EvalConfig:
    """The comparison's settings (``configs/evaluation/default.yaml`` has their defaults).

    Attributes:
        n: questions per fact and method.
        max_facts: use the first ``max_facts`` facts (0 = all).
        split: the run's split to evaluate on when no facts file is given: ``test`` (held
            out) or ``val`` (never trained on).
        temperatures: tempered sampling of the untrained policy, one method per value.
        trained_temperatures: tempered sampling of the trained policy (``trained_T<t>``), each
            compared, paired, with the untrained policy at the same temperature and with beam.
        trained_distinct: also the trained policy as `contraq sample` draws it
            (``trained_distinct``): ``n`` distinct questions per fact, drawn without
            replacement (:func:`contraq.evaluation.questions.sample_distinct_records`).
        draw_factor: ``trained_distinct`` draws ``ceil(draw_factor * n)`` questions per fact
            without replacement and answers the first ``n`` with new content words (1: every
            draw is answered; :func:`contraq.evaluation.questions.sample_distinct_records`).
        untrained_distinct: also the untrained policy drawn so (``untrained_distinct``, T=1):
            sample-and-filter without repeats.
        budgets: numbers of answered questions per fact at which the set each method finds
            is measured (:mod:`contraq.evaluation.yields`; each <= ``n``; ``None``: the powers of
            two below ``n``, and ``n``; empty: none). :attr:`yield_budgets` resolves it.
        trained: the trained policy at T=1 (``trained``); false with no other trained method
            gives the baselines alone, e.g. to reuse later with ``baselines_from``.
        beam: include beam search on the base LM.
        beam_groups: > 1 tries diverse (group) beam search with that many groups.
        diversity_penalty: group beam search's penalty.
        batch_size: sequences per sampling call, and questions per answering call (it
            replaces the run's ``reward.batch_size``).
        seed: every sampling method starts from a generator seeded with it.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``...
        judge: an NLI checkpoint folder that replaces the run's judge for every method.
        baselines_from: an earlier eval folder whose untrained and beam records are reused
            (:mod:`contraq.evaluation.reuse` checks that nothing that shapes them differs).
        workers: processes that share the methods on a CPU, each with ``cores // workers``
            threads (1: all in this process; ignored on CUDA).
    """

    n: int
    max_facts: int
    temperatures: list[float]
    beam: bool
    beam_groups: int
    diversity_penalty: float
    batch_size: int
    seed: int
    device: str
    judge: str | None
    baselines_from: str | None = None
    trained_temperatures: list[float] = field(default_factory=list)
    workers: int = 1
    split: str = "test"
    trained_distinct: bool = False
    untrained_distinct: bool = False
    budgets: list[int] | None = None
    trained: bool = True
    draw_factor: float = 1.0
    distinct_temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ConfigError("split", f"must be one of {sorted(SPLITS)}, got {self.split!r}")
        for key, low in (
            ("n", 1),
            ("batch_size", 1),
            ("beam_groups", 1),
            ("max_facts", 0),
            ("workers", 1),
        ):
            if getattr(self, key) < low:
                raise ConfigError(key, f"must be >= {low}, got {getattr(self, key)}")
        if any(not 1 <= b <= self.n for b in self.yield_budgets):
            raise ConfigError("budgets", f"must each lie in [1, n={self.n}], got {self.budgets}")
        if not 1.0 <= self.draw_factor <= 16.0:
            raise ConfigError("draw_factor", f"must lie in [1, 16], got {self.draw_factor}")
        if not self.distinct_temperature > 0:
            raise ConfigError(
                "distinct_temperature", f"must be > 0, got {self.distinct_temperature}"
            )
        for key in ("temperatures", "trained_temperatures"):
            if any(not t > 0 for t in getattr(self, key)):
                raise ConfigError(key, f"must all be > 0, got {getattr(self, key)}")

    @property
    def yield_budgets(self) -> list[int]:
        """The budgets at which the set per fact is measured, ascending."""
        if self.budgets is not None:
            return sorted(set(self.budgets))
        return [*(2**k for k in range(1, self.n.bit_length()) if 2**k < self.n), self.n]


def baseline_methods(ecfg: EvalConfig) -> list[str]:
    """The baselines' method names (``beam`` also stands for ``diverse_beam``)."""
    names = ["untrained", *(f"untrained_T{t:g}" for t in ecfg.temperatures)]
    names += ["untrained_distinct"] if ecfg.untrained_distinct else []
    return names + (["beam"] if ecfg.beam else [])


def method_names(ecfg: EvalConfig, baselines: bool = True) -> list[str]:
    """Every method the eval runs, in report order (``baselines=False``: the trained
    policy's only)."""
    names = ["trained"] if ecfg.trained else []
    names += [f"trained_T{t:g}" for t in ecfg.trained_temperatures]
    names += ["trained_distinct"] if ecfg.trained_distinct else []
    return names + (baseline_methods(ecfg) if baselines else [])


# A method's rough cost relative to the others (seconds measured on 2 CPU cores, 32 facts x 8:
# trained 111, untrained 143, untrained_T0.5 127, untrained_T0.7 133, beam 175; 106 facts x 8
# at one thread: trained 360-400, trained_distinct 600-750 more).
_COST = {"trained": 0.8, "trained_distinct": 0.8, "beam": 1.3, "file": 0.1}


def split_methods(names: Sequence[str], workers: int) -> list[list[str]]:
    """``names`` dealt to at most ``workers`` groups (group 0 runs in the calling process):
    the trained methods to group 0, then each baseline, costliest first, to the group with
    the least estimated cost so far (longest processing time first)."""
    n = max(1, min(workers, len(names)))
    groups: list[list[str]] = [[] for _ in range(n)]
    load = [0.0] * n

    def cost(name: str) -> float:
        return _COST.get(name.split("_T")[0], 1.0)

    for name in names:
        if name.startswith("trained") or name == "file":
            groups[0].append(name)
            load[0] += cost(name)
    baselines = sorted((m for m in names if m not in groups[0]), key=cost, reverse=True)
    for name in baselines:
        k = min(range(n), key=lambda i: (load[i], i))
        groups[k].append(name)
        load[k] += cost(name)
    return [g for g in groups if g]


def method_records(
    parts: Parts,
    facts: Sequence[EditFact],
    ecfg: EvalConfig,
    names: Sequence[str],
    questions: Sequence[Sequence[str]] | None = None,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, float], list[str]]:
    """The records of the methods ``names`` (see :func:`method_names`; ``file``: the given
    ``questions`` per fact), seconds per method and notes on what ran."""
    prompts = build_prompts(parts.cfg, facts, parts.tokenizer)
    temps = {"trained": (1.0, False), "untrained": (1.0, True)}
    temps |= {f"trained_T{t:g}": (float(t), False) for t in ecfg.trained_temperatures}
    temps |= {f"untrained_T{t:g}": (float(t), True) for t in ecfg.temperatures}
    records: dict[str, list[dict[str, Any]]] = {}
    seconds: dict[str, float] = {}
    notes: list[str] = []
    with progress_bar() as progress:
        for name in names:
            t0 = time.time()
            if name == "beam":
                name, records[name] = beam_records(
                    parts,
                    facts,
                    prompts,
                    groups=ecfg.beam_groups,
                    diversity_penalty=ecfg.diversity_penalty,
                    n=ecfg.n,
                    batch_size=ecfg.batch_size,
                    progress=progress,
                )
                if ecfg.beam_groups > 1 and name == "beam":
                    notes.append(
                        "diverse beam search is not available in the installed transformers "
                        "(moved to a hub repository); plain beam search was used"
                    )
            elif name in ("trained_distinct", "untrained_distinct"):
                per_fact = sample_distinct_records(
                    parts,
                    facts,
                    ecfg.n,
                    batch_size=ecfg.batch_size,
                    seed=ecfg.seed,
                    base=name.startswith("untrained"),
                    method=name,
                    progress=progress,
                    draw_factor=ecfg.draw_factor if name == "trained_distinct" else 1.0,
                    temperature=ecfg.distinct_temperature if name == "trained_distinct" else 1.0,
                )
                records[name] = [r for recs in per_fact for r in recs]
            elif name == "file":
                records[name] = file_records(
                    parts, facts, questions or [], ecfg.batch_size, progress=progress
                )
            else:
                temp, base = temps[name]
                records[name] = policy_records(
                    parts,
                    facts,
                    prompts,
                    name,
                    temp,
                    base,
                    n=ecfg.n,
                    batch_size=ecfg.batch_size,
                    seed=ecfg.seed,
                    progress=progress,
                )
            seconds[name] = time.time() - t0
    return records, seconds, notes


def eval_parts(
    ref: RunRef,
    ecfg: EvalConfig,
    facts_path: str | Path | None,
    questions_path: str | Path | None = None,
) -> tuple[Parts, list[EditFact], str, list[list[str]] | None]:
    """The run's parts as an eval uses them (``ecfg``'s device and judge, answers
    ``ecfg.batch_size`` at a time), its facts, their label (:func:`eval_facts`) and, with a
    questions file, each fact's questions from it (the facts are then the file's)."""
    if facts_path is not None and questions_path is not None:
        raise ConfigError("questions", "takes its facts from the file: give facts= or questions=")
    device = pick_device(ecfg.device)
    parts = load_parts(ref, device=device, judge=ecfg.judge, reward_batch=ecfg.batch_size)
    if questions_path is None:
        facts, label = eval_facts(parts, facts_path, ecfg.max_facts, ecfg.split)
        return parts, facts, label, None
    max_chars = int(OmegaConf.select(parts.cfg, "data.max_fact_chars") or DEFAULT_MAX_CHARS)
    facts, questions = load_questions(questions_path, max_chars)
    if ecfg.max_facts > 0:
        facts, questions = facts[: ecfg.max_facts], questions[: ecfg.max_facts]
    return parts, facts, str(questions_path), questions


def eval_facts(
    parts: Parts, facts_path: str | Path | None, max_facts: int, split: str = "test"
) -> tuple[list[EditFact], str]:
    """The facts to evaluate on and how to name them: a file, else the run's ``split``."""
    if facts_path is not None:
        facts, label = load_facts(facts_path, minimal_ok=True, on_error="raise"), str(facts_path)
    else:
        facts = heldout_facts(parts.cfg, split)
        label = f"{parts.cfg.data.path} ({SPLITS[split]})"
    return (facts[:max_facts] if max_facts > 0 else facts), label


def records_in_workers(
    parts: Parts,
    facts: Sequence[EditFact],
    ecfg: EvalConfig,
    names: Sequence[str],
    spec: dict[str, Any],
    questions: Sequence[Sequence[str]] | None = None,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, float], list[str]]:
    """:func:`method_records` of ``names``, split over ``ecfg.workers`` processes on a CPU
    (in this process alone on CUDA or with one worker). ``spec``: what a worker needs to load
    the same run and facts (``checkpoint``, ``facts``, ``questions``); the ``file`` method
    (``questions``) runs in this process. Returns the records in the order of ``names``."""
    groups = split_methods(names, ecfg.workers)
    device = next(parts.policy.parameters()).device
    if len(groups) == 1 or device.type != "cpu":
        return method_records(parts, facts, ecfg, names, questions)
    threads = max(1, usable_cores() // len(groups))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    # SIGTERM unwinds (the finally below kills the workers, the temp folder is removed), and
    # a worker dies with this process even when it is killed outright.
    parent = os.getpid()
    with (
        sigterm_unwinds("contraq eval"),
        tempfile.TemporaryDirectory(prefix="contraq-eval-") as tmp,
    ):
        procs = []
        for k, group in enumerate(groups[1:], start=1):
            folder = Path(tmp) / f"worker{k}"
            folder.mkdir()
            job = {**spec, "ecfg": asdict(ecfg), "methods": group, "out": str(folder)}
            job["parent"] = parent
            (folder / "spec.json").write_text(json.dumps(job))
            cmd = [sys.executable, "-m", "contraq.evaluation.methods", str(folder / "spec.json")]
            with (folder / "worker.log").open("w") as log:  # the worker keeps its own handle
                procs.append((folder, subprocess.Popen(cmd, env=env, stdout=log, stderr=log)))
        try:
            with torch_threads(threads):
                records, seconds, notes = method_records(parts, facts, ecfg, groups[0], questions)
            for folder, proc in procs:
                _collect(folder, proc, records, seconds, notes)
        finally:
            for _, proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    notes.append(f"{len(groups)} processes of {threads} thread(s) shared the methods: {groups}")
    order = [m for m in names if m in records] + [m for m in records if m not in names]
    return {m: records[m] for m in order}, seconds, notes


def _collect(
    folder: Path,
    proc: subprocess.Popen,
    records: dict[str, list[dict[str, Any]]],
    seconds: dict[str, float],
    notes: list[str],
) -> None:
    """Wait for one worker and add what it wrote; its failure is an error with its log."""
    if proc.wait() != 0:
        log = (folder / "worker.log").read_text(errors="replace").strip().splitlines()
        raise RuntimeError(
            f"eval worker (methods {json.loads((folder / 'spec.json').read_text())['methods']}) "
            f"exited {proc.returncode}:\n" + "\n".join(log[-20:])
        )
    for _, rec in iter_jsonl(folder / "records.jsonl"):
        records.setdefault(str(rec["method"]), []).append(rec)
    done = json.loads((folder / "done.json").read_text())
    seconds.update(done["seconds"])
    notes.extend(n for n in done["notes"] if n not in notes)


def worker_main(spec_path: str) -> None:
    """One worker: the methods of ``SPEC.json`` on its run and facts, written to its folder
    (``records.jsonl``, then ``done.json`` with seconds and notes)."""
    spec = json.loads(Path(spec_path).read_text())
    die_with_parent(spec.get("parent"))  # no orphan computing on when `contraq eval` dies
    ecfg = EvalConfig(**spec["ecfg"])
    ref = resolve_run(spec["checkpoint"])
    parts, facts, _, _ = eval_parts(ref, ecfg, spec.get("facts"), spec.get("questions"))
    records, seconds, notes = method_records(parts, facts, ecfg, spec["methods"])
    out = Path(spec["out"])
    with (out / "records.jsonl").open("w") as fh:
        for recs in records.values():
            for r in recs:
                fh.write(json.dumps(r) + "\n")
    (out / "done.json").write_text(json.dumps({"seconds": seconds, "notes": notes}))


if __name__ == "__main__":
    worker_main(sys.argv[1])
