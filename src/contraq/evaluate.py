"""`contraq eval`: the trained policy against the baselines (:mod:`contraq.baselines`) on the
same held-out facts and question budget, with paired comparisons over facts.

The settings and their defaults are ``configs/eval.yaml`` and its group
``configs/evaluation/`` (which `contraq demo` reads too); the metrics are
:mod:`contraq.metrics`, the tables :mod:`contraq.report`, the figures :mod:`contraq.plots`.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from contraq.baselines import beam_records, policy_records
from contraq.config_check import ConfigError
from contraq.data import EditFact, load_facts
from contraq.metrics import Embedder, flag_counts, summarize
from contraq.parts import Parts, build_prompts
from contraq.plots import (
    plot_rate_vs_diversity,
    plot_reward_distributions,
    plot_reward_vs_diversity,
)
from contraq.questions import progress_bar
from contraq.report import eval_markdown, eval_table
from contraq.reuse import load_baselines
from contraq.runload import RunRef, heldout_facts, load_parts, pick_device, resolve_run
from contraq.settings import typed
from contraq.stats import frontier_value, paired_bootstrap


@dataclass(frozen=True)
class EvalConfig:
    """The comparison's settings (``configs/evaluation/default.yaml`` has their defaults).

    Attributes:
        n: questions per fact and method.
        max_facts: use the first ``max_facts`` facts (0 = all).
        temperatures: tempered sampling of the untrained policy, one method per value.
        trained_temperatures: tempered sampling of the trained policy (``trained_T<t>``), each
            compared, paired, with the untrained policy at the same temperature and with beam.
        beam: include beam search on the base LM.
        beam_groups: > 1 tries diverse (group) beam search with that many groups.
        diversity_penalty: group beam search's penalty.
        batch_size: sequences per sampling call.
        seed: every sampling method starts from a generator seeded with it.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``...
        judge: an NLI checkpoint folder that replaces the run's judge for every method.
        baselines_from: an earlier eval folder whose untrained and beam records are reused
            (:mod:`contraq.reuse` checks that nothing that shapes them differs).
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

    def __post_init__(self) -> None:
        for key, low in (("n", 1), ("batch_size", 1), ("beam_groups", 1), ("max_facts", 0)):
            if getattr(self, key) < low:
                raise ConfigError(key, f"must be >= {low}, got {getattr(self, key)}")
        for key in ("temperatures", "trained_temperatures"):
            if any(not t > 0 for t in getattr(self, key)):
                raise ConfigError(key, f"must all be > 0, got {getattr(self, key)}")


@dataclass(frozen=True)
class EvalTarget:
    """What `contraq eval` evaluates and where it writes (``configs/eval.yaml``)."""

    checkpoint: str
    facts: str | None
    out: str | None


def baseline_methods(ecfg: EvalConfig) -> list[str]:
    """The baselines' method names (``beam`` also stands for ``diverse_beam``)."""
    names = ["untrained", *(f"untrained_T{t:g}" for t in ecfg.temperatures)]
    return names + (["beam"] if ecfg.beam else [])


def _method_records(
    parts: Parts, facts: Sequence[EditFact], ecfg: EvalConfig, baselines: bool = True
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, float], list[str]]:
    """Every method's records (``baselines=False``: the trained policy's only), seconds per
    method and notes on what ran."""
    prompts = build_prompts(parts.cfg, facts, parts.tokenizer)
    methods = [("trained", 1.0, False)]
    methods += [(f"trained_T{t:g}", float(t), False) for t in ecfg.trained_temperatures]
    if baselines:
        methods += [("untrained", 1.0, True)]
        methods += [(f"untrained_T{t:g}", float(t), True) for t in ecfg.temperatures]
    records: dict[str, list[dict[str, Any]]] = {}
    seconds: dict[str, float] = {}
    notes: list[str] = []
    with progress_bar() as progress:
        for name, temp, base in methods:
            t0 = time.time()
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
        if ecfg.beam and baselines:
            t0 = time.time()
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
            seconds[name] = time.time() - t0
            if ecfg.beam_groups > 1 and name == "beam":
                notes.append(
                    "diverse beam search is not available in the installed transformers "
                    "(moved to a hub repository); plain beam search was used"
                )
    return records, seconds, notes


def _facts(
    parts: Parts, facts_path: str | Path | None, max_facts: int
) -> tuple[list[EditFact], str]:
    """The facts to evaluate on and how to name them: a file, else the run's held-out split."""
    if facts_path is not None:
        facts, label = load_facts(facts_path, minimal_ok=True, on_error="raise"), str(facts_path)
    else:
        facts = heldout_facts(parts.cfg)
        label = f"{parts.cfg.data.path} (held-out test split)"
    return (facts[:max_facts] if max_facts > 0 else facts), label


def _settings(ref: RunRef, parts: Parts, ecfg: EvalConfig, **extra: Any) -> dict[str, Any]:
    """The ``settings`` block of ``eval.json``."""
    return {
        "run": str(ref.run_dir),
        "checkpoint": str(ref.ckpt or ref.adapter_dir),
        **extra,
        "n": ecfg.n,
        "seed": ecfg.seed,
        "batch_size": ecfg.batch_size,
        "temperatures": list(ecfg.temperatures),
        "trained_temperatures": list(ecfg.trained_temperatures),
        "beam_groups": ecfg.beam_groups,
        "diversity_penalty": ecfg.diversity_penalty,
        "reward": str(parts.cfg.reward.name),
        "judge": str(
            OmegaConf.select(parts.cfg, "nli.path") or OmegaConf.select(parts.cfg, "nli.train.name")
        ),
    }


def evaluate_run(
    checkpoint: str | Path,
    ecfg: EvalConfig,
    out_dir: str | Path | None = None,
    facts_path: str | Path | None = None,
) -> dict[str, Any]:
    """Compare the trained policy with baselines on the same facts and question budget.

    Methods: ``trained`` (T=1), ``untrained`` (base LM, T=1), ``untrained_T<t>`` per
    temperature, ``beam``/``diverse_beam`` (base LM). Writes into ``out_dir`` (default
    ``RUN/eval``): ``eval.json`` (settings, summary per method, comparisons, examples),
    ``eval.md``, ``questions.jsonl`` (every question with its reward parts) and three PNGs.

    Args:
        checkpoint: run folder, its ``adapter/`` or a ``.ckpt`` (see
            :func:`contraq.runload.resolve_run`).
        facts_path: a facts file (full or minimal schema); ``None`` = the run's held-out
            test split.

    Returns:
        the ``eval.json`` object.
    """
    started = time.time()
    ref = resolve_run(checkpoint)
    out = Path(out_dir) if out_dir is not None else ref.run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(ecfg.device)
    parts = load_parts(ref, device=device, judge=ecfg.judge)
    facts, facts_label = _facts(parts, facts_path, ecfg.max_facts)
    settings = _settings(ref, parts, ecfg, facts=facts_label, n_facts=len(facts))
    reused: dict[str, list[dict[str, Any]]] = {}
    if ecfg.baselines_from:  # checked before any question is drawn
        methods = baseline_methods(ecfg)
        reused, reused_s = load_baselines(ecfg.baselines_from, settings, parts.cfg, facts, methods)
    records, seconds, notes = _method_records(parts, facts, ecfg, baselines=not reused)
    if reused:
        records.update(reused)
        seconds.update(reused_s)
        notes.append(f"baseline records reused from {ecfg.baselines_from} (contraq.reuse)")
        settings["baselines_from"] = str(ecfg.baselines_from)
    settings.update(device=str(device), seconds=time.time() - started, notes=notes)
    return report_records(records, settings, out, seconds, device)


def report_records(
    records: dict[str, list[dict[str, Any]]],
    settings: dict[str, Any],
    out: Path,
    seconds: dict[str, float] | None = None,
    device: Any = "cpu",
) -> dict[str, Any]:
    """Every method's metrics, the paired comparisons with the trained policy, the frontier
    and examples of ``records`` (``{method: records}``), written into ``out`` like
    :func:`evaluate_run` (``settings``: its ``settings`` block, with ``seed`` and
    ``temperatures``). Returns the ``eval.json`` object."""
    embedder = Embedder(device=device)
    summary = {
        name: {**summarize(recs, embedder), "seconds": (seconds or {}).get(name, float("nan"))}
        for name, recs in records.items()
    }
    pick = random.Random(int(settings["seed"]))
    frontier_methods = ["untrained", *(f"untrained_T{t:g}" for t in settings["temperatures"])]
    result: dict[str, Any] = {
        "settings": settings,
        "summary": summary,
        "comparisons": compare_to_trained(records),
        "matched": compare_tempered(records, settings.get("trained_temperatures") or []),
        "frontier": frontier_summary(summary, frontier_methods),
        "examples": {
            name: sorted(pick.sample(recs, min(10, len(recs))), key=lambda r: r["fact_index"])
            for name, recs in records.items()
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    _write(out, result, records, frontier_methods)
    return result


def _write(
    out: Path,
    result: dict[str, Any],
    records: dict[str, list[dict[str, Any]]],
    frontier_methods: Sequence[str],
) -> None:
    """``questions.jsonl``, the PNGs, ``eval.json`` and ``eval.md`` into ``out``."""
    with (out / "questions.jsonl").open("w") as fh:
        for recs in records.values():
            for r in recs:
                fh.write(json.dumps(r) + "\n")
    summary = result["summary"]
    log_r = {k: [float(r["log_r"]) for r in v] for k, v in records.items()}
    plots = {
        "Reward per method": plot_reward_distributions(log_r, out / "reward_distribution.png"),
        "Reward vs diversity": plot_reward_vs_diversity(summary, out / "reward_vs_diversity.png"),
        "Counted rate vs diversity": plot_rate_vs_diversity(
            summary, frontier_methods, out / "rate_vs_diversity.png"
        ),
    }
    (out / "eval.json").write_text(json.dumps(_json_safe(result), indent=2))
    (out / "eval.md").write_text(eval_markdown(result, {k: p.name for k, p in plots.items()}))


def compare_to_trained(
    records: dict[str, list[dict[str, Any]]], key: str = "genuine_rate"
) -> dict[str, dict[str, float]]:
    """Paired bootstrap over facts of the trained policy's rate ``key`` minus each other
    method's (:func:`contraq.stats.paired_bootstrap`); empty without a ``trained`` method or
    where the rate is not measurable."""
    return compare_method(records, "trained", [m for m in records if m != "trained"], key)


def compare_method(
    records: dict[str, list[dict[str, Any]]],
    method: str,
    others: Sequence[str],
    key: str = "genuine_rate",
) -> dict[str, dict[str, float]]:
    """Paired bootstrap over facts of ``method``'s rate ``key`` minus each of ``others``
    (those present); empty when ``method`` is absent or its rate is not measurable."""
    mine = flag_counts(records[method], key) if method in records else {}
    if not mine:
        return {}
    return {
        name: paired_bootstrap(mine, flag_counts(records[name], key))
        for name in others
        if name in records
    }


def compare_tempered(
    records: dict[str, list[dict[str, Any]]], temperatures: Sequence[float]
) -> dict[str, dict[str, dict[str, float]]]:
    """For each trained policy at temperature t (``trained_T<t>``): paired comparisons with
    the untrained policy at the same t and with beam search, the baselines nearest to it in
    diversity."""
    return {
        f"trained_T{t:g}": compare_method(
            records, f"trained_T{t:g}", [f"untrained_T{t:g}", "untrained", "beam", "diverse_beam"]
        )
        for t in temperatures
    }


def frontier_summary(
    summary: dict[str, dict[str, float]], methods: Sequence[str], key: str = "genuine_rate"
) -> dict[str, float] | None:
    """The untrained policy's rate-vs-diversity frontier (``methods``: it at several
    temperatures) read at the trained policy's diversity (:func:`contraq.stats.frontier_value`)."""
    if "trained" not in summary:
        return None
    points = [(summary[m]["diversity"], summary[m][key]) for m in methods if m in summary]
    x = summary["trained"]["diversity"]
    return {
        "diversity": x,
        "trained_rate": summary["trained"][key],
        "frontier_rate": frontier_value(points, x),
    }


def _json_safe(obj: Any) -> Any:
    """NaN/inf become None: strict JSON readers reject them."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def run_eval(cfg: DictConfig) -> dict[str, Any]:
    """`contraq eval`: :func:`evaluate_run` with the composed ``configs/eval.yaml``; prints
    the metrics table and where the files are."""
    target = typed(EvalTarget, cfg)
    result = evaluate_run(target.checkpoint, typed(EvalConfig, cfg), target.out, target.facts)
    out = Path(target.out) if target.out else Path(result["settings"]["run"]) / "eval"
    print(eval_table(result["summary"]))
    print(f"\nwrote {out / 'eval.md'}, {out / 'eval.json'}, {out / 'questions.jsonl'} and plots")
    return result
