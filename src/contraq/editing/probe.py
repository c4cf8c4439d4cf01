"""`contraq probe`'s core: an edited model answers questions as the base LM answers in
training, and the run's judge scores each answer against the question's edit fact.

The answer prompt, its greedy decoding (one line) and the judge's verdict are the reward's
own code (:class:`contraq.reward.answers.BaseLMAnswers`, :func:`judge_answers`,
:func:`counted_flags`): the edit *fails* on a question when the judge counts the edited
model's answer as a genuine contradiction of the edit (a question, no echo, P > 0.5).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from contraq.data import DataError, EditFact
from contraq.editing.dataset import context_for
from contraq.files import iter_jsonl
from contraq.reward.answers import BaseLMAnswers
from contraq.reward.contradiction import ContradictionRewardConfig, counted_flags, judge_answers


def answer_settings(groups: DictConfig) -> ContradictionRewardConfig:
    """The reward's answering settings (answer prompt, length cap, batch size, judge_question)
    of a run config; a run with another reward answers with the contradiction defaults."""
    reward = groups.get("reward")
    if reward is None or reward.get("name") != "contradiction":
        return ContradictionRewardConfig(w_ans=0.0)
    values = OmegaConf.to_container(reward, resolve=True)
    assert isinstance(values, dict)
    return replace(ContradictionRewardConfig.from_mapping(values), w_ans=0.0)


class Answerer(BaseLMAnswers):
    """The reward's answering code around any LM; an in-context edit is stated on the line
    before the answer prompt (chat: inside the user turn)."""

    def __init__(self, tokenizer: Any, cfg: ContradictionRewardConfig) -> None:
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.term_id = -1  # only log P_A reads it, and w_ans is 0
        self._setup_answers(tokenizer)

    @contextlib.contextmanager
    def stating(self, context: str | None) -> Iterator[None]:
        """Answer prompts with ``context`` on the line before them (``None``: as they are)."""
        if context is None:
            yield
            return
        saved = self.cfg
        ap = saved.answer_prompt
        stated = replace(
            ap,
            chat_template_text=f"{context}\n{ap.chat_template_text}",
            fewshot_text=f"{context}\n{ap.fewshot_text}",
        )
        self.cfg = replace(saved, answer_prompt=stated)
        try:
            yield
        finally:
            self.cfg = saved

    def answer(
        self, questions: Sequence[str], lm: nn.Module, context: str | None = None
    ) -> list[str]:
        """Greedy one-line answers (the reward's :meth:`generate_answers`), with ``context``
        stated before each answer prompt."""
        if not questions:
            return []
        with self.stating(context):
            return self.generate_answers(questions, lm)[0]


@dataclass(frozen=True)
class Question:
    """One row of a questions file: where it is, which of the edit's facts it probes."""

    where: str
    fact: int
    method: str
    question: str
    base_answer: str | None
    base_counted: bool | None


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def read_questions(path: Path, facts: Sequence[EditFact], edited: str) -> list[Question]:
    """The rows of a questions file (what `contraq sample` writes: ``question`` and the fact's
    ``edit_fact``; ``method``, ``answer`` and ``genuine`` when present). A row whose fact is not
    one of the edit's ``facts`` is a DataError naming ``file:line``."""
    index = {_norm(f.edit_fact): i for i, f in enumerate(facts)}
    rows: list[Question] = []
    try:
        records = list(iter_jsonl(path))
    except (OSError, ValueError) as exc:
        raise DataError(f"questions={path}: {exc}", str(path)) from None
    for line, rec in records:
        where = f"{path}:{line}"
        q, fact = rec.get("question"), rec.get("edit_fact")
        if not isinstance(q, str) or not q.strip():
            raise DataError(f"{where}: question: missing or empty", str(path), line, "question")
        if not isinstance(fact, str) or _norm(fact) not in index:
            raise DataError(
                f"{where}: edit_fact {fact!r} is not one of the {len(facts)} facts of "
                f"edited={edited}",
                str(path),
                line,
                "edit_fact",
            )
        genuine = rec.get("genuine")
        rows.append(
            Question(
                where,
                index[_norm(fact)],
                str(rec.get("method") or "questions"),
                q.strip(),
                rec.get("answer"),
                None if genuine is None else bool(genuine),
            )
        )
    if not rows:
        raise DataError(f"questions={path}: no question rows", str(path))
    return rows


def facts_of_questions(path: Path) -> list[EditFact]:
    """The distinct facts a questions file names (``subject``, ``edit_fact``,
    ``original_answer``), for an in-context edit without a facts file."""
    seen: dict[str, EditFact] = {}
    for line, rec in iter_jsonl(path):
        fact = rec.get("edit_fact")
        if isinstance(fact, str) and _norm(fact) not in seen:
            subject = rec.get("subject")
            if not isinstance(subject, str):
                raise DataError(f"{path}:{line}: subject: missing", str(path), line, "subject")
            seen[_norm(fact)] = EditFact(
                subject=" ".join(subject.split()),
                edit_fact=" ".join(fact.split()),
                original_answer=rec.get("original_answer"),
                source=str(path),
                line=line,
            )
    return list(seen.values())


def answer_all(
    answerer: Answerer,
    lm: nn.Module,
    facts: Sequence[EditFact],
    rows: Sequence[Question],
    template: str | None,
) -> list[str]:
    """The edited model's answer to every row; an in-context edit answers fact by fact (each
    fact stated before its own questions)."""
    if template is None:
        return answerer.answer([r.question for r in rows], lm)
    answers: list[str] = [""] * len(rows)
    for i, fact in enumerate(facts):
        idx = [k for k, r in enumerate(rows) if r.fact == i]
        got = answerer.answer([rows[k].question for k in idx], lm, context_for(template, fact))
        for k, a in zip(idx, got, strict=True):
            answers[k] = a
    return answers


def judge_rows(
    nli: Any,
    cfg: ContradictionRewardConfig,
    facts: Sequence[EditFact],
    rows: Sequence[Question],
    answers: Sequence[str],
) -> list[dict[str, Any]]:
    """One record per question: the answer, P(contradiction | edit, answer), the form flags
    and ``fails`` (the judge counts the answer as a genuine contradiction of the edit)."""
    edit_facts = [facts[r.fact].edit_fact for r in rows]
    questions = [r.question for r in rows]
    log_c, is_q, echo = judge_answers(nli, edit_facts, questions, answers, cfg.judge_question)
    fails = counted_flags(log_c, is_q, echo)
    p = torch.exp(log_c).tolist()
    out = []
    for k, r in enumerate(rows):
        f = facts[r.fact]
        out.append(
            {
                "where": r.where,
                "fact_index": r.fact,
                "subject": f.subject,
                "edit_fact": f.edit_fact,
                "method": r.method,
                "question": r.question,
                "answer": answers[k],
                "p_contradiction": round(float(p[k]), 6),
                "is_question": bool(is_q[k]),
                "echo": bool(echo[k]),
                "fails": bool(fails[k]),
                "base_answer": r.base_answer,
                "base_contradicts": r.base_counted,
            }
        )
    return out
