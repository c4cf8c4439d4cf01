"""`contraq rescore`: an evaluation's questions and answers judged again by another judge.

The questions and the base LM's answers of every method are kept (``questions.jsonl`` of a
`contraq eval` folder); only what the judge decides is recomputed: ``log_c``, ``is_echo``,
``genuine`` and ``log_r`` (with the run's reward settings). Seconds instead of the eval's
half hour, so a new judge can be compared on every method's exact questions.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from contraq.config.checks import ConfigError
from contraq.config.settings import typed
from contraq.evaluation.evaluate import report_records
from contraq.evaluation.questions import reward_step
from contraq.evaluation.report import eval_table
from contraq.evaluation.reuse import read_eval_folder, with_log_r
from contraq.judge.scorer import NLIScorer, load_scorer
from contraq.reward.contradiction import (
    ContradictionRewardConfig,
    counted_flags,
    judge_answers,
)
from contraq.run.load import RunError, load_run_config


@dataclass(frozen=True)
class RescoreConfig:
    """``configs/rescore.yaml``."""

    records: str  # an eval folder (with questions.jsonl and eval.json)
    judge: str  # the NLI checkpoint folder that judges again
    out: str  # where the new eval.json, eval.md, questions.jsonl and plots go
    run: str | None = None  # the run whose reward settings apply; None: eval.json's run


def rescore_records(
    records: Sequence[dict[str, Any]], nli: NLIScorer, rcfg: ContradictionRewardConfig, step: int
) -> list[dict[str, Any]]:
    """Copies of ``records`` with the judge's fields recomputed by ``nli`` (the reward's own
    :func:`contraq.reward.contradiction.judge_answers` and :func:`counted_flags`) and log R
    with them (:func:`contraq.evaluation.reuse.with_log_r`)."""
    if not records:
        return []
    if any(r.get("answer") is None for r in records):
        raise ConfigError(
            "records", "every record needs the base LM's answer (contradiction reward)"
        )
    log_c, question, echo = judge_answers(
        nli,
        [str(r["edit_fact"]) for r in records],
        [str(r["question"]) for r in records],
        [str(r["answer"]) for r in records],
        rcfg.judge_question,
    )
    genuine = counted_flags(log_c, question, echo)
    judged = [
        {
            **r,
            "log_c": float(log_c[i]),
            "is_question": float(question[i]),
            "is_echo": float(echo[i]),
            "genuine": float(genuine[i]),
        }
        for i, r in enumerate(records)
    ]
    return with_log_r(judged, rcfg, step)


def run_rescore(cfg: DictConfig) -> dict[str, Any]:
    """`contraq rescore`: judge an eval folder's records again and write a new eval folder."""
    rc = typed(RescoreConfig, cfg)
    started = time.time()
    old, by_method = read_eval_folder(Path(rc.records), "records")
    run_dir = Path(rc.run or old["settings"]["run"])
    try:
        run_cfg = load_run_config(run_dir)
    except RunError as exc:
        raise ConfigError("run", f"{exc} (give run=RUN, the run the evaluation scored)") from None
    if str(run_cfg.reward.name) != "contradiction":
        raise ConfigError(
            "run", f"rescoring needs the contradiction reward, not {run_cfg.reward.name}"
        )
    run_cfg.nli.path = str(rc.judge)
    nli = load_scorer(run_cfg.nli)
    rcfg = ContradictionRewardConfig.from_mapping(run_cfg.reward)
    step = reward_step(run_cfg)
    records = {m: rescore_records(recs, nli, rcfg, step) for m, recs in by_method.items()}
    settings = {
        **old["settings"],
        "judge": str(rc.judge),
        "rescored_from": str(rc.records),
        "rescore_seconds": time.time() - started,
    }
    seconds = {m: float(s.get("seconds") or float("nan")) for m, s in old["summary"].items()}
    result = report_records(records, settings, Path(rc.out), seconds)
    print(eval_table(result["summary"]))
    print(f"\nwrote {Path(rc.out) / 'eval.md'} (judge {rc.judge}, records of {rc.records})")
    return result
