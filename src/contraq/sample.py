"""`contraq sample`: distinct questions for new edit facts from a trained run.

The questions of a fact are drawn without replacement (:mod:`contraq.lm.stochastic_beam`): ``n``
draws, ``n`` distinct questions, each answered once. Each comes with its answer, the reward's
parts (log C, log P_Q, log R), whether it counts (a question, not an echo, judged a
contradiction) and its near-duplicate group within the fact (:func:`contraq.genuine.content_key`);
the settings and their defaults are ``configs/sample.yaml``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from contraq.config.checks import ConfigError
from contraq.config.settings import typed
from contraq.data import DEFAULT_MAX_CHARS, load_facts
from contraq.evaluation.questions import progress_bar, sample_distinct_records
from contraq.files import check_output_file, resolve_path, write_output_file
from contraq.genuine import content_key
from contraq.run.load import load_parts, load_run_config, pick_device, resolve_run

# CSV columns in this order, then any other field of the records.
SAMPLE_FIELDS = (
    "fact_index",
    "subject",
    "edit_fact",
    "original_answer",
    "question",
    "answer",
    "counted",
    "group",
    "log_r",
    "log_c",
    "log_pq",
    "length",
    "n_actions",
)


@dataclass(frozen=True)
class SampleConfig:
    """The settings of `contraq sample` (``configs/sample.yaml`` has their defaults)."""

    checkpoint: str
    facts: str
    out: str
    n: int
    csv: bool
    plain: bool
    temperature: float
    batch_size: int
    seed: int
    device: str
    overwrite: bool = False
    draw_factor: float = 1.0

    def __post_init__(self) -> None:
        for key in ("n", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if not self.temperature > 0:
            raise ConfigError("temperature", f"must be > 0, got {self.temperature}")
        if not 1.0 <= self.draw_factor <= 16.0:
            raise ConfigError("draw_factor", f"must lie in [1, 16], got {self.draw_factor}")


def questions_text(records: Sequence[dict[str, Any]], as_csv: bool) -> str:
    """JSON Lines (every field) or CSV (:data:`SAMPLE_FIELDS` then any other field)."""
    if not as_csv:
        return "".join(json.dumps(r) + "\n" for r in records)
    extra = sorted({k for r in records for k in r} - set(SAMPLE_FIELDS))
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=[*SAMPLE_FIELDS, *extra], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(records)
    return buf.getvalue()


def write_questions(
    records: Sequence[dict[str, Any]], path: Path, as_csv: bool, overwrite: bool = True
) -> None:
    """:func:`questions_text` written atomically to ``path``
    (:func:`contraq.files.write_output_file`)."""
    write_output_file(path, questions_text(records, as_csv).encode(), overwrite)


def mark_sets(records: Sequence[dict[str, Any]]) -> int:
    """Give each record of one fact ``counted`` (a counted contradiction) and ``group`` (its
    near-duplicate group, numbered in order of first appearance); returns the number of
    distinct counted contradictions (groups with a counted question)."""
    groups: dict[str, int] = {}
    found: set[int] = set()
    for r in records:
        r["counted"] = bool(r.get("genuine"))
        r["group"] = groups.setdefault(content_key(str(r["question"])), len(groups))
        if r["counted"]:
            found.add(r["group"])
    return len(found)


def run_sample(cfg: DictConfig) -> Path:
    """`contraq sample`: write ``cfg.n`` distinct scored questions per fact of ``cfg.facts``
    to ``cfg.out`` and print how many distinct counted contradictions each fact has.

    Raises:
        ConfigError, RunError, DataError: a bad setting, run folder or facts file (nothing
            is written).
    """
    s = typed(SampleConfig, cfg)
    ref = resolve_run(s.checkpoint)
    out = Path(s.out)
    # Before any sampling: a refused out= costs nothing and replaces nothing.
    check_output_file(out, s.overwrite, reads=[resolve_path(s.facts)], owned=[ref.run_dir])
    data_cfg = load_run_config(ref.run_dir).get("data") or {}
    max_chars = int(data_cfg.get("max_fact_chars", DEFAULT_MAX_CHARS))
    facts = load_facts(s.facts, minimal_ok=True, on_error="raise", max_chars=max_chars)
    parts = load_parts(ref, plain=s.plain, device=pick_device(s.device))
    with progress_bar() as progress:
        per_fact = sample_distinct_records(
            parts,
            facts,
            s.n,
            temperature=s.temperature,
            batch_size=s.batch_size,
            seed=s.seed,
            method="plain" if s.plain else "trained",
            base=s.plain,
            progress=progress,
            draw_factor=s.draw_factor,
        )
    found = [mark_sets(recs) for recs in per_fact]
    for f, recs, k in zip(facts, per_fact, found, strict=True):
        short = f", only {len(recs)} questions exist" if len(recs) < s.n else ""
        print(f"{f.where} ({f.subject}): {k} distinct counted contradictions{short}")
    print(
        f"{sum(found)} distinct counted contradictions over {len(facts)} facts "
        f"({sum(found) / max(len(facts), 1):.2f} per fact, {s.n} questions each)"
    )
    records = [r for recs in per_fact for r in recs]
    write_questions(records, out, s.csv, s.overwrite)
    print(f"wrote {len(records)} questions for {len(facts)} facts to {out}")
    return out
