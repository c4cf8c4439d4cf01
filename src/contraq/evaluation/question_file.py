"""Questions from a file, scored like any method's: a user's own probes, or a dataset's
hand-written questions (e.g. zsRE's crowd-written question and its paraphrase), compared with
the trained sampler on the same facts (`contraq eval questions=FILE`).

The file is JSON Lines: each row holds a fact (the full schema, or the minimal
``{subject, edit_fact}``) and a ``question``. Its facts, in order of first appearance, are
the facts the eval runs every method on; a fact's questions keep the file's order (its
budget is its number of questions).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from contraq.data import DEFAULT_MAX_CHARS, DataError, EditFact, load_facts
from contraq.evaluation.questions import chunks, score_records
from contraq.files import iter_jsonl
from contraq.lm.sampling import SampleBatch
from contraq.lm.tokens import left_pad, right_pad
from contraq.run.parts import Parts, build_prompts


def fact_key(fact: EditFact) -> tuple[str, str]:
    """Rows with the same subject and edit fact ask about one fact."""
    return (fact.subject, fact.edit_fact)


def load_questions(
    path: str | Path, max_chars: int = DEFAULT_MAX_CHARS
) -> tuple[list[EditFact], list[list[str]]]:
    """The file's distinct facts and, per fact, its questions in file order.

    Raises:
        DataError: a row without a fact (see :func:`contraq.data.load_facts`) or without a
            non-empty string ``question``, naming the file and line.
    """
    rows = load_facts(
        path, minimal_ok=True, on_error="raise", max_chars=max_chars, one_row_per_fact=False
    )
    questions = {line: obj.get("question") for line, obj in iter_jsonl(path)}
    facts: dict[tuple[str, str], EditFact] = {}
    asked: dict[tuple[str, str], list[str]] = {}
    for fact in rows:
        q = questions.get(fact.line)
        if not isinstance(q, str) or not q.strip():
            raise DataError(
                f"{path}:{fact.line}: field 'question' must be a non-empty string, got {q!r}",
                str(path),
                fact.line,
                "question",
            )
        facts.setdefault(fact_key(fact), fact)
        asked.setdefault(fact_key(fact), []).append(" ".join(q.split()))
    return list(facts.values()), [asked[k] for k in facts]


def question_batch(
    parts: Parts, prompts: Sequence[Sequence[int]], questions: Sequence[str]
) -> SampleBatch:
    """Given questions as a :class:`SampleBatch` (row b asks ``questions[b]`` after
    ``prompts[b]``): the tokens the policy would emit, ending with the termination token (a
    question is kept whole, even past ``sampler.max_len``); log P_F is not defined for them
    (zeros)."""
    cfg = parts.sampler_cfg
    device = next(parts.policy.parameters()).device
    term = cfg.termination_token_id
    seqs = []
    for q in questions:
        ids = parts.tokenizer.encode(" " + q.strip(), add_special_tokens=False)
        if term in ids:
            ids = ids[: ids.index(term)]
        seqs.append([*ids, term])
    ids, mask = left_pad(prompts, cfg.pad_token_id, device)
    actions = right_pad(seqs, cfg.pad_token_id, device)
    zeros = torch.zeros(actions.shape, device=device)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long, device=device)
    return SampleBatch(ids, mask, actions, lengths, zeros, zeros.clone())


def file_records(
    parts: Parts,
    facts: Sequence[EditFact],
    questions: Sequence[Sequence[str]],
    batch_size: int,
    method: str = "file",
    progress: Any = None,
) -> list[dict[str, Any]]:
    """Every question of ``questions[i]`` (fact ``i``) scored by the run's reward."""
    prompts = build_prompts(parts.cfg, facts, parts.tokenizer)
    rows = [(i, q) for i, qs in enumerate(questions) for q in qs]
    task = progress.add_task(method, total=len(rows)) if progress else None
    records: list[dict[str, Any]] = []
    for chunk in chunks(rows, batch_size):
        fact_ids = [i for i, _ in chunk]
        batch = question_batch(parts, [prompts[i] for i in fact_ids], [q for _, q in chunk])
        records += score_records(parts, facts, fact_ids, batch, method)
        if progress:
            progress.advance(task, len(chunk))
    return records
