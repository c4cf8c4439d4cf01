"""`contraq edit` and `contraq probe`: settings (``configs/edit.yaml``, ``configs/probe.yaml``),
the work, and the output folders (written whole, never over an existing folder)."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from contraq.config.checks import ConfigError
from contraq.config.settings import typed
from contraq.editing.dataset import (
    EditCase,
    dataset_metrics,
    load_cases,
    probes_path,
    write_cases,
)
from contraq.editing.editors import EDITORS, FTSettings, control_facts, fit_ft
from contraq.editing.models import (
    ADAPTER_DIR,
    EDIT_JSON,
    FACTS_FILE,
    base_groups,
    load_base,
    load_edited,
    model_record,
    model_settings,
)
from contraq.editing.probe import (
    Answerer,
    answer_all,
    answer_settings,
    facts_of_questions,
    judge_rows,
    read_questions,
)
from contraq.editing.summary import markdown, per_fact, plot, source_rows, usual_metrics
from contraq.files import resolve_path, write_dir_atomically
from contraq.judge.scorer import load_scorer
from contraq.run.load import pick_device

log = logging.getLogger(__name__)


def _check_context(text: str) -> None:
    if "{edit_fact}" not in text:
        raise ConfigError("context", f"must contain {{edit_fact}}, got {text!r}")


@dataclass(frozen=True)
class EditConfig:
    """The settings of `contraq edit` (defaults: ``configs/edit.yaml``)."""

    facts: str
    out: str
    editor: str
    base: str | None
    probes: str | None
    path: str | None
    context: str
    device: str

    def __post_init__(self) -> None:
        if self.editor not in EDITORS:
            raise ConfigError(
                "editor", f"expected one of {', '.join(EDITORS)}, got {self.editor!r}"
            )
        if self.editor == "external" and not self.path:
            raise ConfigError(
                "path", "editor=external needs path=DIR (a peft adapter or HF folder)"
            )
        _check_context(self.context)


@dataclass(frozen=True)
class ProbeConfig:
    """The settings of `contraq probe` (defaults: ``configs/probe.yaml``)."""

    edited: str
    questions: str
    out: str
    facts: str | None
    base: str | None
    probes: str | None
    context: str
    device: str

    def __post_init__(self) -> None:
        _check_context(self.context)


def _quiet_loading() -> None:
    """No per-tensor loading bars on stderr: a refusal stays one line."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def new_folder(out: str) -> Path:
    """``out`` as a folder to create: an existing path is refused (nothing is overwritten)."""
    path = Path(out).expanduser()
    if path.exists():
        raise ConfigError("out", f"{path} exists; give a new folder (nothing is overwritten)")
    return path


def _fact_info(cases: Sequence[EditCase]) -> list[dict[str, Any]]:
    return [
        {"subject": c.fact.subject, "edit_fact": c.fact.edit_fact, "case_id": c.case_id}
        for c in cases
    ]


def run_edit(cfg: DictConfig) -> Path:
    """`contraq edit`: edit the base LM with ``cfg.facts`` and write ``cfg.out``.

    Raises:
        ConfigError, DataError, EditedModelError: a bad setting, facts file or model folder.
    """
    s = typed(EditConfig, cfg)
    out = new_folder(s.out)
    _quiet_loading()
    groups = base_groups(cfg)
    mcfg = model_settings(groups)
    cases = load_cases(s.facts, probes_path(s.probes))
    device = pick_device(s.device)
    start = time.perf_counter()
    record: dict[str, Any] = {
        "editor": s.editor,
        "facts": str(resolve_path(s.facts).resolve()),
        "n_facts": len(cases),
        "base_run": s.base,
        "model": model_record(mcfg),
    }
    adapter_src: Path | None = None
    if s.editor == "ft":
        ft = typed(FTSettings, cfg.ft, prefix="ft.")
        base, tok = load_base(mcfg, device)
        facts = [c.fact for c in cases]
        control = control_facts(ft.control, facts, ft.n_control, ft.seed)
        lm, history = fit_ft(base, tok, facts, control, ft, mcfg)
        metrics = dataset_metrics(lm, None, tok, cases)
        record.update(ft=asdict(ft), n_control=len(control), history=history)
    elif s.editor == "in_context":
        lm, tok = load_base(mcfg, device)
        metrics = dataset_metrics(lm, None, tok, cases, template=s.context)
        record["context"] = s.context
    else:
        edited = load_edited(str(s.path), mcfg, device, s.context, None)
        lm, tok = edited.lm, edited.tokenizer
        metrics = dataset_metrics(lm, edited.base, tok, cases)
        src = Path(str(s.path)).expanduser().resolve()
        if edited.kind == "adapter":
            adapter_src = src
        else:
            record["path"] = str(src)
    record["seconds"] = round(time.perf_counter() - start, 1)
    record["metrics"] = usual_metrics(metrics)
    record["per_fact"] = [{**i, **m} for i, m in zip(_fact_info(cases), metrics, strict=True)]

    def write(tmp: Path) -> None:
        if s.editor == "ft":
            lm.save_pretrained(str(tmp / ADAPTER_DIR))  # safetensors, peft format
        elif adapter_src is not None:
            shutil.copytree(adapter_src, tmp / ADAPTER_DIR)
        write_cases(cases, tmp / FACTS_FILE)
        (tmp / EDIT_JSON).write_text(json.dumps(record, indent=2) + "\n")

    write_dir_atomically(out, write, lambda p: False)
    m = record["metrics"]
    print(
        f"{s.editor} edit of {len(cases)} facts in {record['seconds']} s: efficacy "
        f"{m['efficacy']:.3f}, generalisation {m['generalisation']:.3f}, locality "
        f"{m['locality']:.3f}\nwrote {out}"
    )
    return out


def run_probe(cfg: DictConfig) -> Path:
    """`contraq probe`: the edited model answers every question of ``cfg.questions``; the
    judge scores each answer against its edit fact; writes ``cfg.out``.

    Raises:
        ConfigError, DataError, EditedModelError: a bad setting, questions file or model.
    """
    s = typed(ProbeConfig, cfg)
    out = new_folder(s.out)
    _quiet_loading()
    qpath = resolve_path(s.questions)
    if not qpath.is_file():
        raise ConfigError("questions", f"{qpath}: no such file")
    groups = base_groups(cfg)
    acfg = answer_settings(groups)
    device = pick_device(s.device)
    probes = probes_path(s.probes)
    nli = load_scorer(groups.nli, device=device)  # before the LM: a missing judge fails first
    start = time.perf_counter()
    edited = load_edited(
        s.edited, model_settings(groups), device, s.context, lambda p: load_cases(p, probes)
    )
    cases = edited.cases
    if cases is None:
        if s.facts:
            cases = load_cases(s.facts, probes)
        elif edited.kind == "in_context":
            cases = [EditCase(f, {}) for f in facts_of_questions(qpath)]
        else:
            raise ConfigError("facts", f"edited={s.edited} records no facts: give facts=FILE")
    facts = [c.fact for c in cases]
    rows = read_questions(qpath, facts, s.edited)
    answers = answer_all(Answerer(edited.tokenizer, acfg), edited.lm, facts, rows, edited.context)
    records = judge_rows(nli, acfg, facts, rows, answers)
    metrics = dataset_metrics(edited.lm, edited.base, edited.tokenizer, cases, edited.context)
    facts_out = per_fact(_fact_info(cases), metrics, records)
    summary = {
        "edited": s.edited,
        "editor": edited.kind,
        "questions": str(qpath),
        "n_facts": len(cases),
        "n_questions": len(records),
        "seconds": round(time.perf_counter() - start, 1),
        "usual_metrics": usual_metrics(metrics),
        "sources": source_rows(facts_out),
        "answer_prompt": asdict(acfg.answer_prompt),
        "judge": str(getattr(nli, "path_or_id", "")),
    }
    write_probe(out, records, facts_out, summary)
    print(markdown(summary))
    print(f"wrote {out}")
    return out


def write_probe(
    out: Path,
    records: Sequence[dict[str, Any]],
    facts: Sequence[dict[str, Any]],
    summary: dict[str, Any],
) -> None:
    """probe.jsonl (per question), probe_facts.jsonl (per fact), probe.json, probe.md and
    probe.png, all at once."""

    def lines(rows: Sequence[dict[str, Any]]) -> str:
        return "".join(json.dumps(r) + "\n" for r in rows)

    def write(tmp: Path) -> None:
        (tmp / "probe.jsonl").write_text(lines(records))
        (tmp / "probe_facts.jsonl").write_text(lines(facts))
        (tmp / "probe.json").write_text(json.dumps(summary, indent=2) + "\n")
        (tmp / "probe.md").write_text(markdown(summary))
        plot(summary, tmp / "probe.png")

    write_dir_atomically(out, write, lambda p: False)
