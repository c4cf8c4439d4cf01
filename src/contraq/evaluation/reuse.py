"""Baseline records of an earlier evaluation, reused when nothing that makes them differs.

The untrained policy and beam search depend on the base LM, the question prompt, the sampler,
the reward (answers, judge), the facts and the eval's own settings, never on the trained
adapter. `contraq eval baselines_from=EVAL_DIR` takes them from an earlier eval folder after
checking all of that, so comparing a new recipe costs its own questions only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from contraq.config.checks import ConfigError, fill_absent
from contraq.config.schema import run_defaults
from contraq.data import EditFact
from contraq.evaluation.questions import reward_step
from contraq.files import iter_jsonl, jsonl_or_gz
from contraq.reward.contradiction import (
    ContradictionRewardConfig,
    counted_flags,
    counted_log_r,
    novelty_credit,
)
from contraq.run.load import RunError, load_run_config

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
    "dtype",
    "sample_weights",
)
RUN_GROUPS = ("model", "prompt", "sampler", "reward")
# Reward keys that change only log R, which is recomputed under this run's reward; the others
# (answer prompt, echo rules, ...) change the records themselves.
LOG_R_KEYS = (
    "beta",
    "w_lik",
    "w_div",
    "w_share",
    "div_gate",
    "log_c_floor",
    "min_len",
    "min_log_r",
    "hybrid_steps",
    "hybrid_threshold",
    "hybrid_penalty",
)
# eval.json files written before batch_size, dtype or sample_weights was recorded had these.
OLD_DEFAULTS = {"batch_size": 32, "dtype": "float32", "sample_weights": "shared"}


def _plain(node: Any, group: str) -> Any:
    plain = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    if group == "reward" and isinstance(plain, dict):
        # batch_size only chunks the work (an eval replaces it with its own batch_size).
        plain = {k: v for k, v in plain.items() if k not in (*LOG_R_KEYS, "batch_size")}
    if group == "model" and isinstance(plain, dict):
        # Compared as loaded instead (settings "dtype"): `auto` is float32 on some machines.
        plain = {k: v for k, v in plain.items() if k != "dtype"}
    return plain


def _differences(
    old: dict[str, Any], settings: dict[str, Any], old_cfg: Any, run_cfg: Any
) -> list[str]:
    """What differs between the earlier evaluation and this one (empty: reusable)."""
    diff = [k for k in SETTINGS_KEYS if old.get(k, OLD_DEFAULTS.get(k)) != settings.get(k)]
    schema = run_defaults()
    for group in RUN_GROUPS:
        mine = _plain(run_cfg.get(group), group)
        # A key added to the schema since the earlier run was written is no difference.
        defaults = schema.get(group)
        if group == "reward" and mine.get("name") == "contradiction":
            # The reward group's schema is its dataclass (the run schema leaves it open).
            defaults = asdict(ContradictionRewardConfig())
        theirs = fill_absent(_plain(old_cfg.get(group), group), mine, defaults)
        if theirs != mine:
            diff.append(f"run config {group}")
    return diff


def earlier_run(folder: Path, named: str) -> Path:
    """The run folder an eval folder came from: the one its settings name, or, when that is
    gone (the eval folder was copied to another machine or into docs/), the eval folder's
    parent if it holds a ``config.yaml`` (the ``RUN/eval...`` layout)."""
    run = Path(named)
    if not (run / "config.yaml").is_file() and (folder.parent / "config.yaml").is_file():
        return folder.parent
    return run


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
    old, by_method = read_eval_folder(folder, "baselines_from")
    try:
        old_cfg = load_run_config(earlier_run(folder, old["settings"]["run"]))
    except (KeyError, RunError) as exc:
        raise ConfigError(
            "baselines_from", f"{folder}: not a reusable eval folder ({exc})"
        ) from None
    diff = _differences(old["settings"], settings, old_cfg, run_cfg)
    rows = [r for recs in by_method.values() for r in recs]
    old_facts = {(r["fact_index"], r.get("subject"), r["edit_fact"]) for r in rows}
    if old_facts != {(i, f.subject, f.edit_fact) for i, f in enumerate(facts)}:
        diff.append("facts")
    if diff:
        raise ConfigError(
            "baselines_from", f"{folder} differs from this evaluation in: {', '.join(diff)}"
        )
    records: dict[str, list[dict[str, Any]]] = {}
    for name in methods:
        found = [m for m in by_method if m == name or (name == "beam" and m.endswith("beam"))]
        if not found:
            raise ConfigError("baselines_from", f"{folder} has no {name} records")
        records[found[0]] = by_method[found[0]]
    seconds = {m: float(old["summary"][m].get("seconds") or float("nan")) for m in records}
    cfg, step = ContradictionRewardConfig.from_mapping(run_cfg.reward), reward_step(run_cfg)
    return {m: with_log_r(recs, cfg, step) for m, recs in records.items()}, seconds


def with_log_r(
    records: Sequence[dict[str, Any]], cfg: ContradictionRewardConfig, step: int
) -> list[dict[str, Any]]:
    """Copies of judged records (``log_c``, ``is_question``, ``is_echo``, ``log_pq``,
    ``length``) with ``log_r`` recomputed under the reward ``cfg``
    (:func:`contraq.reward.contradiction.counted_log_r`). With ``cfg.w_div != 0`` each record's
    ``novelty`` is used, or computed among the records of its method and fact when any lacks
    it (records written before the term existed); ``cfg.div_gate`` reads each record's
    ``question`` and ``subject``. With ``cfg.w_share != 0`` each record's ``crowding`` is used,
    or computed among the counted records of its method and fact when any lacks it."""
    if not records:
        return []
    novelty = None
    if cfg.w_div != 0.0:
        if all("novelty" in r for r in records):
            novelty = torch.tensor([float(r["novelty"]) for r in records])
        else:
            novelty = records_novelty(records)
        records = [{**r, "novelty": float(novelty[i])} for i, r in enumerate(records)]
        questions = [str(r["question"]) for r in records]
        novelty = novelty_credit(
            novelty, questions, [str(r.get("subject") or "") for r in records], cfg.div_gate
        )
    flag = lambda key: torch.tensor([bool(r[key]) for r in records])  # noqa: E731
    value = lambda key: torch.tensor([float(r[key]) for r in records])  # noqa: E731
    crowding = None
    if cfg.w_share != 0.0:
        if all("crowding" in r for r in records):
            crowding = value("crowding")
        else:
            counted = counted_flags(value("log_c"), flag("is_question"), flag("is_echo"))
            crowding = records_crowding(records, counted)
        records = [{**r, "crowding": float(crowding[i])} for i, r in enumerate(records)]
    log_pa = value("log_pa") if cfg.w_ans != 0.0 else None
    log_r, _ = counted_log_r(
        cfg,
        value("log_c"),
        flag("is_question") & ~flag("is_echo"),
        value("log_pq"),
        value("length"),
        log_pa,
        step,
        novelty,
        crowding,
    )
    return [{**r, "log_r": float(log_r[i])} for i, r in enumerate(records)]


def records_novelty(records: Sequence[dict[str, Any]]) -> torch.Tensor:
    """``FloatTensor[N]``: each record's :func:`contraq.lm.embedding.group_novelty` among the
    records of the same method and fact."""
    from contraq.lm.embedding import Embedder, group_novelty

    embeddings = Embedder().encode([str(r["question"]) for r in records])
    return group_novelty(embeddings, [(r.get("method"), r["fact_index"]) for r in records])


def records_crowding(records: Sequence[dict[str, Any]], counted: torch.Tensor) -> torch.Tensor:
    """``FloatTensor[N]``: each counted record's :func:`contraq.lm.embedding.cluster_crowding`
    among the counted records of the same method and fact (1 for the others)."""
    from contraq.lm.embedding import Embedder, cluster_crowding

    embeddings = Embedder().encode([str(r["question"]) for r in records])
    groups = [(r.get("method"), r["fact_index"]) for r in records]
    return cluster_crowding(embeddings, groups, counted)


# What a record of an eval folder needs to be reused or judged again (`contraq eval` writes them).
NEEDED = ("method", "fact_index", "edit_fact", "question", "answer", "log_pq", "length")


def read_eval_folder(
    folder: Path, key: str
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """(eval.json, {method: records in file order}) of a `contraq eval` folder; problems are a
    :class:`ConfigError` naming the setting ``key`` that pointed there."""
    for name in ("eval.json", "questions.jsonl"):
        if not jsonl_or_gz(folder / name).is_file():
            raise ConfigError(key, f"{folder / name} not found (a `contraq eval` folder)")
    by_method: dict[str, list[dict[str, Any]]] = {}
    try:
        result = json.loads((folder / "eval.json").read_text())
        for lineno, rec in iter_jsonl(folder / "questions.jsonl"):
            missing = [k for k in NEEDED if k not in rec]
            if missing:
                raise ValueError(f"{folder / 'questions.jsonl'}:{lineno}: no {', '.join(missing)}")
            by_method.setdefault(str(rec["method"]), []).append(rec)
    except ValueError as exc:  # json.JSONDecodeError is one
        raise ConfigError(key, str(exc)) from None
    return result, by_method
