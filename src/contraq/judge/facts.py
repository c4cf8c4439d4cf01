"""Edit facts as the pair builder sees them, and the subject-level train/held-out split."""

from __future__ import annotations

import os
from dataclasses import dataclass

from contraq.data import load_facts, stable_unit
from contraq.genuine import normalize_text
from contraq.judge.vocab import SUBJECT_SLOT


@dataclass(frozen=True)
class FactRow:
    """One edit fact reduced to what the pair builder needs.

    ``template`` is the prompt with the subject replaced by a slot (``None`` when the subject
    does not occur in the prompt); ``origin`` is ``file:line`` for error messages.
    """

    prompt: str
    subject: str
    template: str | None
    edited: str
    original: str
    origin: str


def same_answer(a: str, b: str) -> bool:
    """Whether two answers may name the same thing (equal after normalisation, or one is a
    whole-word part of the other: "Colt's Manufacturing" vs "Colt's Manufacturing Company").
    Such pairs are never used as contradictions."""
    x, y = normalize_text(a), normalize_text(b)
    if not x or not y:
        return x == y
    return x == y or f" {x} " in f" {y} " or f" {y} " in f" {x} "


def read_fact_rows(path: str | os.PathLike[str]) -> list[FactRow]:
    """Edit facts of a JSON Lines file (schema of ``data/zsre_1000.jsonl``) as :class:`FactRow`.

    Loaded by :func:`contraq.data.load_facts`: invalid rows (null/"nan" answers, such as zsRE's
    8 rows without an edit) are skipped with one warning; a broken file raises
    :class:`contraq.data.DataError` naming the file, line and field.
    """
    rows: list[FactRow] = []
    for fact in load_facts(path):
        prompt, subject = fact.prompt or "", fact.subject
        edited, original = fact.edited_answer, fact.original_answer
        if not prompt or edited is None or original is None:  # guaranteed by the full schema
            raise ValueError(f"{fact.where}: prompt and both answers are required")
        template = prompt.replace(subject, SUBJECT_SLOT, 1) if subject in prompt else None
        rows.append(FactRow(prompt, subject, template, edited, original, fact.where))
    return rows


def heldout_subject(subject: str, fraction: float, seed: int) -> bool:
    """Stable subject-level split of the judge's facts (case-insensitive; its own key, not
    :func:`contraq.data.split_facts`'s, so the judge's held-out subjects stay as trained)."""
    return stable_unit(f"{seed}\x1f{subject.lower()}") < fraction
