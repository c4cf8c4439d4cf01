"""Baseline records of an earlier evaluation, reused when nothing that makes them differs.

The untrained policy and beam search depend on the base LM, the question prompt, the sampler,
the reward (answers, judge), the facts and the eval's own settings, never on the trained
adapter. `contraq eval baselines_from=EVAL_DIR` takes them from an earlier eval folder after
checking all of that, so comparing a new recipe costs its own questions only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from contraq.config_check import ConfigError
from contraq.data import EditFact
from contraq.files import iter_jsonl
from contraq.questions import reward_step
from contraq.reward.contradiction import ContradictionRewardConfig, counted_log_r
from contraq.runload import RunError, load_run_config

# eval.json settings that must agree, and the run-config groups that shape baseline records.
SETTINGS_KEYS = (
    "n",
    "seed",
    "temperatures",
    "beam_groups",
    "diversity_penalty",
    "batch_size",
    "judge",
    "n_facts",
)
RUN_GROUPS = ("model", "prompt", "sampler", "reward")
# Reward keys that change only log R, which is recomputed under this run's reward; the others
# (answer prompt, echo rules, ...) change the records themselves.
LOG_R_KEYS = (
    "beta",
    "w_lik",
    "log_c_floor",
    "min_len",
    "min_log_r",
    "hybrid_steps",
    "hybrid_threshold",
    "hybrid_penalty",
)
# eval.json files written before batch_size was recorded all sampled with the default.
OLD_DEFAULTS = {"batch_size": 32}


def _plain(node: Any, group: str) -> Any:
    plain = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    if group == "reward" and isinstance(plain, dict):
        plain = {k: v for k, v in plain.items() if k not in LOG_R_KEYS}
    return plain


def _differences(
    old: dict[str, Any], settings: dict[str, Any], old_cfg: Any, run_cfg: Any
) -> list[str]:
    """What differs between the earlier evaluation and this one (empty: reusable)."""
    diff = [k for k in SETTINGS_KEYS if old.get(k, OLD_DEFAULTS.get(k)) != settings.get(k)]
    for group in RUN_GROUPS:
        if _plain(old_cfg.get(group), group) != _plain(run_cfg.get(group), group):
            diff.append(f"run config {group}")
    return diff


def load_baselines(
    folder: str | Path,
    settings: dict[str, Any],
    run_cfg: Any,
    facts: Sequence[EditFact],
    methods: Sequence[str],
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, float]]:
    """``methods``' records and seconds from the eval folder ``folder``.

    Args:
        settings: this evaluation's ``eval.json`` settings (:data:`SETTINGS_KEYS` compared).
        run_cfg: the evaluated run's config (:data:`RUN_GROUPS` compared with the earlier run's).
        facts: this evaluation's facts, in order (compared by subject and edit).
        methods: the baseline methods to take (``beam`` stands for either beam method).

    Raises:
        ConfigError: ``baselines_from`` names no eval folder, or one that differs (each
            difference named), or lacks a method.
    """
    folder = Path(folder)
    try:
        old = json.loads((folder / "eval.json").read_text())
        old_cfg = load_run_config(Path(old["settings"]["run"]))
        rows = [rec for _, rec in iter_jsonl(folder / "questions.jsonl")]
    except (OSError, KeyError, ValueError, RunError) as exc:
        raise ConfigError(
            "baselines_from", f"{folder}: not a reusable eval folder ({exc})"
        ) from None
    diff = _differences(old["settings"], settings, old_cfg, run_cfg)
    old_facts = {(r["fact_index"], r["subject"], r["edit_fact"]) for r in rows}
    if old_facts != {(i, f.subject, f.edit_fact) for i, f in enumerate(facts)}:
        diff.append("facts")
    if diff:
        raise ConfigError(
            "baselines_from", f"{folder} differs from this evaluation in: {', '.join(diff)}"
        )
    by_method: dict[str, list[dict[str, Any]]] = {}
    for rec in rows:
        by_method.setdefault(str(rec["method"]), []).append(rec)
    records: dict[str, list[dict[str, Any]]] = {}
    for name in methods:
        found = [m for m in by_method if m == name or (name == "beam" and m.endswith("beam"))]
        if not found:
            raise ConfigError("baselines_from", f"{folder} has no {name} records")
        records[found[0]] = by_method[found[0]]
    seconds = {m: float(old["summary"][m].get("seconds") or float("nan")) for m in records}
    return {m: _with_log_r(recs, run_cfg) for m, recs in records.items()}, seconds


def _with_log_r(records: list[dict[str, Any]], run_cfg: Any) -> list[dict[str, Any]]:
    """The records with ``log_r`` recomputed under this run's reward (its beta, w_lik...)."""
    cfg = ContradictionRewardConfig.from_mapping(run_cfg.reward)
    flag = lambda key: torch.tensor([bool(r[key]) for r in records])  # noqa: E731
    value = lambda key: torch.tensor([float(r[key]) for r in records])  # noqa: E731
    log_pa = value("log_pa") if cfg.w_ans != 0.0 else None
    log_r, _ = counted_log_r(
        cfg,
        value("log_c"),
        flag("is_question") & ~flag("is_echo"),
        value("log_pq"),
        value("length"),
        log_pa,
        reward_step(run_cfg),
    )
    return [{**r, "log_r": float(log_r[i])} for i, r in enumerate(records)]
