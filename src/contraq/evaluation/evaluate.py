"""`contraq eval`: the trained policy against the baselines
(:mod:`contraq.evaluation.baselines`) on the same held-out facts and question budget, with paired comparisons over facts.

The settings and their defaults are ``configs/eval.yaml`` and its group
``configs/evaluation/`` (which `contraq demo` reads too); the metrics are
:mod:`contraq.evaluation.metrics`, the tables :mod:`contraq.evaluation.report`, the figures
:mod:`contraq.evaluation.plots`.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from contraq.config.checks import ConfigError
from contraq.config.settings import typed
from contraq.evaluation.methods import (
    EvalConfig,
    baseline_methods,
    eval_parts,
    method_names,
    records_in_workers,
)
from contraq.evaluation.metrics import Embedder, flag_counts, summarize
from contraq.evaluation.plots import (
    plot_rate_vs_diversity,
    plot_reward_distributions,
    plot_reward_vs_diversity,
    plot_yield,
)
from contraq.evaluation.report import eval_markdown, eval_table
from contraq.evaluation.reuse import load_baselines
from contraq.evaluation.stats import frontier_value, paired_bootstrap
from contraq.evaluation.yields import fact_yields, yield_summary
from contraq.lm.models import weights_dtype
from contraq.run.load import RunRef, pick_device, resolve_run
from contraq.run.parts import Parts


@dataclass(frozen=True)
class EvalTarget:
    """What `contraq eval` evaluates and where it writes (``configs/eval.yaml``)."""

    checkpoint: str
    facts: str | None
    out: str | None
    questions: str | None = None  # a questions file: its facts, its questions as method `file`


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
        "trained_distinct": ecfg.trained_distinct,
        "draw_factor": ecfg.draw_factor,
        "distinct_temperature": ecfg.distinct_temperature,
        "untrained_distinct": ecfg.untrained_distinct,
        "budgets": ecfg.yield_budgets,
        "beam_groups": ecfg.beam_groups,
        "diversity_penalty": ecfg.diversity_penalty,
        # The base LM's weights as loaded (model.dtype=auto resolves per machine).
        "dtype": weights_dtype(parts.policy),
        "sample_weights": parts.sample_weights(),
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
    questions_path: str | Path | None = None,
) -> dict[str, Any]:
    """Compare the trained policy with baselines on the same facts and question budget.

    Methods: ``trained`` (T=1), ``untrained`` (base LM, T=1), ``untrained_T<t>`` per
    temperature, ``beam``/``diverse_beam`` (base LM). Writes into ``out_dir`` (default
    ``RUN/eval``): ``eval.json`` (settings, summary per method, comparisons, examples),
    ``eval.md``, ``questions.jsonl`` (every question with its reward parts) and three PNGs.

    Args:
        checkpoint: run folder, its ``adapter/`` or a ``.ckpt`` (see
            :func:`contraq.run.load.resolve_run`).
        facts_path: a facts file (full or minimal schema); ``None`` = the run's split named
            by ``ecfg.split`` (the held-out test split by default).
        questions_path: a questions file (:mod:`contraq.evaluation.question_file`): its facts
            replace ``facts_path``'s and its questions are one more method, ``file``.

    Returns:
        the ``eval.json`` object.
    """
    started = time.time()
    ref = resolve_run(checkpoint)
    out = Path(out_dir) if out_dir is not None else ref.run_dir / "eval"
    if out.exists() and not out.is_dir():
        raise ConfigError("out", f"{out} is a file; give a folder")
    parts, facts, facts_label, questions = eval_parts(ref, ecfg, facts_path, questions_path)
    out.mkdir(parents=True, exist_ok=True)  # once the run and the facts are known good
    device = pick_device(ecfg.device)
    settings = _settings(ref, parts, ecfg, facts=facts_label, n_facts=len(facts))
    reused: dict[str, list[dict[str, Any]]] = {}
    if ecfg.baselines_from:  # checked before any question is drawn
        methods = baseline_methods(ecfg)
        reused, reused_s = load_baselines(ecfg.baselines_from, settings, parts.cfg, facts, methods)
    facts_arg = None if facts_path is None else str(facts_path)
    questions_arg = None if questions_path is None else str(questions_path)
    spec = {"checkpoint": str(checkpoint), "facts": facts_arg, "questions": questions_arg}
    names = method_names(ecfg, baselines=not reused) + (["file"] if questions else [])
    records, seconds, notes = records_in_workers(parts, facts, ecfg, names, spec, questions)
    if reused:
        records.update(reused)
        seconds.update(reused_s)
        notes.append(
            f"baseline records reused from {ecfg.baselines_from} (contraq.evaluation.reuse)"
        )
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
        "matched": compare_matched(records, settings.get("trained_temperatures") or []),
        "frontier": frontier_summary(summary, frontier_methods),
        "yield": set_yields(records, settings.get("budgets") or [], embedder, settings["seed"]),
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
    if result.get("yield"):
        plots["The set per fact"] = plot_yield(result["yield"], out / "yield.png")
    (out / "eval.json").write_text(json.dumps(_json_safe(result), indent=2))
    (out / "eval.md").write_text(eval_markdown(result, {k: p.name for k, p in plots.items()}))


def set_yields(
    records: dict[str, list[dict[str, Any]]],
    budgets: Sequence[int],
    embedder: Embedder,
    seed: int = 0,
) -> dict[str, Any] | None:
    """The set each method finds per fact at each budget (:mod:`contraq.evaluation.yields`), the
    trained policy as `contraq sample` draws it (``trained_distinct``, else ``trained``)
    compared with each other method; ``None`` without budgets or counted flags."""
    if not budgets or not any(r.get("genuine") is not None for v in records.values() for r in v):
        return None
    per_method = {m: fact_yields(recs, budgets, embedder.encode) for m, recs in records.items()}
    target = "trained_distinct" if "trained_distinct" in records else "trained"
    return yield_summary(per_method, target, seed=seed)


def compare_to_trained(
    records: dict[str, list[dict[str, Any]]], key: str = "genuine_rate"
) -> dict[str, dict[str, float]]:
    """Paired bootstrap over facts of the trained policy's rate ``key`` minus each other
    method's (:func:`contraq.evaluation.stats.paired_bootstrap`); empty without a ``trained``
    method or where the rate is not measurable."""
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


def compare_matched(
    records: dict[str, list[dict[str, Any]]], temperatures: Sequence[float]
) -> dict[str, dict[str, dict[str, float]]]:
    """The trained policy's other methods against their nearest baselines, paired: each
    ``trained_T<t>`` against the untrained policy at the same t and beam search;
    ``trained_distinct`` against beam search (both give distinct questions) and the untrained
    policy."""
    beams = ["beam", "diverse_beam"]
    matched = {
        f"trained_T{t:g}": compare_method(
            records, f"trained_T{t:g}", [f"untrained_T{t:g}", "untrained", *beams]
        )
        for t in temperatures
    }
    if "trained_distinct" in records:
        matched["trained_distinct"] = compare_method(
            records, "trained_distinct", [*beams, "untrained"]
        )
    return matched


def frontier_summary(
    summary: dict[str, dict[str, float]], methods: Sequence[str], key: str = "genuine_rate"
) -> dict[str, float] | None:
    """The untrained policy's rate-vs-diversity frontier (``methods``: it at several
    temperatures) read at the trained policy's diversity
    (:func:`contraq.evaluation.stats.frontier_value`)."""
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
    ecfg = typed(EvalConfig, cfg)
    result = evaluate_run(target.checkpoint, ecfg, target.out, target.facts, target.questions)
    out = Path(target.out) if target.out else Path(result["settings"]["run"]) / "eval"
    print(eval_table(result["summary"]))
    print(f"\nwrote {out / 'eval.md'}, {out / 'eval.json'}, {out / 'questions.jsonl'} and plots")
    return result
