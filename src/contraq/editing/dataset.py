"""Edit facts with the dataset's own probes, and the editing literature's metrics on them.

A CounterFact fact (``case_id``) has, in ``counterfact_probes_1000.jsonl``, a paraphrased cloze
prompt of the edited relation (generalisation: it should now complete with the new object) and
a neighbouring subject's prompt with its true answer (locality: the edit should not change
what the LM says there). Facts without a ``case_id`` (or probes file) get efficacy only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from contraq.data import DataError, EditFact, load_facts
from contraq.editing.scores import agreement, encode_rows, score_targets
from contraq.files import REPO_ROOT, iter_jsonl, resolve_path

DEFAULT_PROBES = REPO_ROOT.parent / "shared" / "data" / "counterfact_probes_1000.jsonl"


@dataclass(frozen=True)
class EditCase:
    """One edit fact, its raw record (``case_id`` kept) and its dataset probes (or ``None``)."""

    fact: EditFact
    record: dict[str, Any]
    rephrase_prompt: str | None = None
    locality_prompt: str | None = None
    locality_truth: str | None = None

    @property
    def case_id(self) -> Any:
        return self.record.get("case_id")


def probes_path(setting: str | None) -> Path | None:
    """``probes=`` as a path; ``None``: the shared CounterFact probes beside the repository
    when present."""
    if setting:
        path = resolve_path(setting)
        if not path.is_file():
            raise DataError(f"probes={setting}: no such file", str(path))
        return path
    return DEFAULT_PROBES if DEFAULT_PROBES.is_file() else None


def read_probes(path: Path | None) -> dict[Any, tuple[str, dict[str, Any]]]:
    """``{case_id: (file:line, record)}`` of a probes file (empty without one)."""
    if path is None:
        return {}
    out: dict[Any, tuple[str, dict[str, Any]]] = {}
    for line, rec in iter_jsonl(path):
        out[rec.get("case_id")] = (f"{path}:{line}", rec)
    return out


def load_cases(
    facts_path: str | Path, probes: Path | None, minimal_ok: bool = False
) -> list[EditCase]:
    """The facts of ``facts_path`` with their probes (matched on ``case_id``; a probe whose
    subject differs from its fact's is a DataError naming both lines)."""
    path = resolve_path(facts_path)
    facts = load_facts(path, minimal_ok=minimal_ok, on_error="raise")
    raw = dict(iter_jsonl(path))
    table = read_probes(probes)
    cases = []
    for f in facts:
        rec = raw[f.line]
        hit = table.get(rec.get("case_id")) if "case_id" in rec else None
        if hit is None:
            cases.append(EditCase(f, rec))
            continue
        where, p = hit
        if " ".join(str(p.get("subject", "")).split()) != f.subject:
            raise DataError(
                f"{where}: subject {p.get('subject')!r} differs from {f.where}'s {f.subject!r} "
                "(probes file of another dataset?)",
                where,
            )
        cases.append(
            EditCase(f, rec, p["rephrase_prompt"], p["locality_prompt"], p["locality_ground_truth"])
        )
    return cases


def write_cases(cases: Sequence[EditCase], path: Path) -> None:
    """The facts' raw records (``case_id`` kept), one per line."""
    path.write_text("".join(json.dumps(c.record) + "\n" for c in cases))


def stated(context: str | None, prompt: str) -> str:
    """A prompt as the in-context editor sees it (the edit stated first)."""
    return prompt if context is None else f"{context}\n{prompt}"


def context_for(template: str | None, fact: EditFact) -> str | None:
    """The in-context template filled with the fact (``None`` without a template)."""
    return None if template is None else template.replace("{edit_fact}", fact.edit_fact)


def dataset_metrics(
    lm: nn.Module,
    base: nn.Module | None,
    tokenizer: Any,
    cases: Sequence[EditCase],
    template: str | None = None,
) -> list[dict[str, Any]]:
    """Per fact: ``efficacy`` (the edit prompt completes with the new object),
    ``generalisation`` (the rephrase prompt does), ``locality`` (share of the neighbour's
    answer tokens where the edited LM's argmax equals the base's) and ``locality_kept`` (all
    of them equal); with ``template`` the edit is stated before every prompt. ``base=None``:
    ``lm`` with its adapter disabled. Metrics a fact has no probe for are ``None``."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ctx = [context_for(template, c.fact) for c in cases]
    usable = [c for c in cases if c.fact.prompt and c.fact.edited_answer]
    eff = _completes(
        lm,
        tokenizer,
        pad,
        [
            (stated(x, c.fact.prompt or ""), c.fact.edited_answer or "")
            for c, x in zip(cases, ctx, strict=True)
            if c in usable
        ],
    )
    with_probes = [
        (c, x)
        for c, x in zip(cases, ctx, strict=True)
        if c.rephrase_prompt and c.fact.edited_answer
    ]
    gen = _completes(
        lm,
        tokenizer,
        pad,
        [(stated(x, c.rephrase_prompt or ""), c.fact.edited_answer or "") for c, x in with_probes],
    )
    loc_rows = encode_rows(
        tokenizer,
        [stated(x, c.locality_prompt or "") for c, x in with_probes],
        [c.locality_truth or "" for c, _ in with_probes],
    )
    after = score_targets(lm, loc_rows, pad)
    if base is None and hasattr(lm, "disable_adapter"):
        with lm.disable_adapter():
            before = score_targets(lm, loc_rows, pad)
    else:
        plain_rows = encode_rows(
            tokenizer,
            [c.locality_prompt or "" for c, _ in with_probes],
            [c.locality_truth or "" for c, _ in with_probes],
        )
        before = score_targets(base if base is not None else lm, plain_rows, pad)
    eff_by = dict(zip([id(c) for c in usable], eff, strict=True))
    probe_by = {
        id(c): (g, agreement(a, b), a.completes, b.completes)
        for (c, _), g, a, b in zip(with_probes, gen, after, before, strict=True)
    }
    return [_fact_row(c, eff_by.get(id(c)), probe_by.get(id(c))) for c in cases]


def _completes(
    lm: nn.Module, tokenizer: Any, pad: int, pairs: Sequence[tuple[str, str]]
) -> list[bool]:
    if not pairs:
        return []
    rows = encode_rows(tokenizer, [p for p, _ in pairs], [t for _, t in pairs])
    return [s.completes for s in score_targets(lm, rows, pad)]


def _fact_row(
    case: EditCase, eff: bool | None, probe: tuple[bool, float, bool, bool] | None
) -> dict[str, Any]:
    row: dict[str, Any] = {"efficacy": eff, "generalisation": None, "locality": None}
    if probe is not None:
        gen, loc, truth_after, truth_before = probe
        row.update(
            generalisation=gen,
            locality=loc,
            locality_kept=loc == 1.0,
            locality_truth_edited=truth_after,
            locality_truth_base=truth_before,
        )
    return row
