"""Questions from a loaded run: draw a batch from its policy, score it with its reward.

Shared by `contraq sample` (:mod:`contraq.sample`) and `contraq eval`
(:mod:`contraq.evaluation.baselines`, :mod:`contraq.evaluation.methods`): one record (a dict) per question, with the fact, the answer and
every per-question part of the reward; :func:`sample_distinct_records` draws ``n`` distinct
questions per fact without replacement.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import torch
from omegaconf import DictConfig

from contraq.data import EditFact
from contraq.genuine import content_key
from contraq.lm.models import base_model
from contraq.lm.sampling import SampleBatch, sample
from contraq.lm.stochastic_beam import sample_distinct
from contraq.lm.tokens import decode_questions, left_pad
from contraq.run.parts import Parts, build_prompts


def reward_step(cfg: DictConfig) -> int:
    """A step at which the reward is its final form (after any hybrid warm-up)."""
    reward = cfg.get("reward", {}) or {}
    return int(reward.get("hybrid_steps", 0) or 0)


def sample_policy(
    parts: Parts,
    prompts: Sequence[Sequence[int]],
    temperature: float,
    generator: torch.Generator,
    base: bool = False,
) -> SampleBatch:
    """One question per prompt from the policy (``base``: with adapters disabled) at
    ``temperature``; log-probs in the batch are the untempered policy's."""
    device = next(parts.policy.parameters()).device
    ids, mask = left_pad(prompts, parts.sampler_cfg.pad_token_id, device)
    cfg = replace(parts.sampler_cfg, temperature=float(temperature))
    if base:
        with base_model(parts.sampler_lm()) as lm:
            return sample(lm, ids, mask, cfg, generator=generator)
    return sample(parts.sampler_lm(), ids, mask, cfg, generator=generator)


def score_records(
    parts: Parts,
    facts: Sequence[EditFact],
    fact_ids: Sequence[int],
    batch: SampleBatch,
    method: str,
) -> list[dict[str, Any]]:
    """Score a batch with the run's reward (at :func:`reward_step`): one record per question.

    Args:
        facts: all facts; ``fact_ids[b]`` is row b's fact.
    """
    with torch.no_grad():
        out = parts.reward().terminal(
            [facts[i] for i in fact_ids], batch, step=reward_step(parts.cfg)
        )
    comps = {
        k: v.detach().float().cpu().tolist()
        for k, v in out.components.items()
        if torch.is_tensor(v) and v.dim() == 1
    }
    log_r = out.log_r.detach().float().cpu().tolist()
    n_actions = batch.lengths.cpu().tolist()
    records = []
    for b, i in enumerate(fact_ids):
        f = facts[i]
        rec: dict[str, Any] = {
            "method": method,
            "fact_index": int(i),
            "subject": f.subject,
            "edit_fact": f.edit_fact,
            "original_answer": f.original_answer,
            "question": out.questions[b],
            "answer": out.answers[b] if out.answers is not None else None,
            "log_r": log_r[b],
        }
        for k, v in comps.items():
            rec[k] = v[b]
        rec["n_actions"] = int(n_actions[b])
        rec.setdefault("length", float(n_actions[b]))
        records.append(rec)
    return records


def progress_bar() -> Any:
    """A rich progress display on stderr (stdout keeps the results)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )


def chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    """Consecutive slices of at most ``size`` items."""
    for start in range(0, len(items), max(1, size)):
        yield items[start : start + max(1, size)]


def dedup_key(question: str) -> str:
    """Questions equal up to case and whitespace count as duplicates."""
    return " ".join(question.split()).lower()


def select_rows(batch: SampleBatch, rows: Sequence[int]) -> SampleBatch:
    """The SampleBatch of the given rows."""
    idx = torch.tensor(list(rows), dtype=torch.long, device=batch.actions.device)
    return SampleBatch(**{k: getattr(batch, k)[idx] for k in SampleBatch.__dataclass_fields__})


def sample_distinct_records(
    parts: Parts,
    facts: Sequence[EditFact],
    n: int,
    temperature: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    base: bool = False,
    method: str = "trained",
    progress: Any = None,
    draw_factor: float = 1.0,
) -> list[list[dict[str, Any]]]:
    """``n`` distinct questions per fact, drawn without replacement from the policy (``base``:
    the untrained policy) at ``temperature`` (:func:`contraq.lm.stochastic_beam.sample_distinct`),
    each scored by the reward (answered once).

    With ``draw_factor`` 1 every draw is answered. Above 1, ``ceil(draw_factor * n)`` are
    drawn without replacement and the first ``n`` (in drawing order) whose content words
    (:func:`contraq.genuine.content_key`) no earlier one has are answered: no answer is spent
    on a rephrasing that only moves function words. Facts go ``max(1, batch_size // k)`` at a
    time, ``k`` beams each. A fact with fewer possible questions gets fewer.

    Returns:
        per fact, its records in drawing order.
    """
    if not draw_factor >= 1.0:
        raise ValueError(f"draw_factor must be >= 1, got {draw_factor}")
    k = max(n, math.ceil(draw_factor * n - 1e-9))
    prompts = build_prompts(parts.cfg, facts, parts.tokenizer)
    device = next(parts.policy.parameters()).device
    generator = torch.Generator(device=device).manual_seed(int(seed))
    cfg = replace(parts.sampler_cfg, temperature=float(temperature))
    per_fact: list[list[dict[str, Any]]] = [[] for _ in facts]
    task = progress.add_task(method, total=n * len(facts)) if progress else None
    for chunk in chunks(list(range(len(facts))), max(1, batch_size // k)):
        ids, mask = left_pad([prompts[i] for i in chunk], cfg.pad_token_id, device)
        if base:
            with base_model(parts.sampler_lm()) as lm:
                out = sample_distinct(lm, ids, mask, cfg, k, generator=generator)
        else:
            out = sample_distinct(parts.sampler_lm(), ids, mask, cfg, k, generator=generator)
        rows = out.valid.nonzero().flatten().tolist()
        if k > n:
            texts = decode_questions(parts.tokenizer, out.batch.actions, out.batch.lengths)
            rows = first_new_content(rows, [texts[r] for r in rows], [r // k for r in rows], n)
        fact_ids = [chunk[r // k] for r in rows]
        for rec in score_records(parts, facts, fact_ids, select_rows(out.batch, rows), method):
            per_fact[rec["fact_index"]].append(rec)
        if progress:
            progress.advance(task, len(chunk) * n)
    return per_fact


def first_new_content(
    rows: Sequence[int], texts: Sequence[str], groups: Sequence[int], n: int
) -> list[int]:
    """The rows to answer: per group (a fact), in the given (drawing) order, the first ``n``
    whose :func:`contraq.genuine.content_key` is new to the group."""
    seen: dict[int, set[str]] = {}
    kept: list[int] = []
    for row, text, group in zip(rows, texts, groups, strict=True):
        keys = seen.setdefault(group, set())
        key = content_key(text)
        if key not in keys and len(keys) < n:
            keys.add(key)
            kept.append(row)
    return kept
