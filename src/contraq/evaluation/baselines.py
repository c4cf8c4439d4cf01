"""The methods `contraq eval` compares the trained policy with, on the same facts and
question budget: the untrained policy (the base LM, adapters disabled) sampled at several
temperatures, and beam search on the base LM (diverse group beam search when available).

Each method returns records as :func:`contraq.evaluation.questions.score_records` makes them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from transformers import GenerationConfig, LogitsProcessorList

from contraq.data import EditFact
from contraq.evaluation.questions import chunks, sample_policy, score_records
from contraq.lm.models import base_model
from contraq.lm.sampling import SampleBatch, SamplerConfig, score_actions, step_bias
from contraq.lm.tokens import left_pad, right_pad
from contraq.run.parts import Parts

log = logging.getLogger(__name__)

# Whether group beam search works here; set False after the first failure.
_DIVERSE_BEAM = {"ok": True}


def policy_records(
    parts: Parts,
    facts: Sequence[EditFact],
    prompts: Sequence[Sequence[int]],
    name: str,
    temperature: float,
    base: bool,
    n: int,
    batch_size: int,
    seed: int,
    progress: Any,
) -> list[dict[str, Any]]:
    """``n`` sampled questions per fact from the policy (``base``: the untrained policy) at
    ``temperature``, scored; every method starts from a generator seeded with ``seed``."""
    device = next(parts.policy.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    rows = [i for i in range(len(facts)) for _ in range(n)]
    task = progress.add_task(name, total=len(rows))
    records: list[dict[str, Any]] = []
    for chunk in chunks(rows, batch_size):
        batch = sample_policy(parts, [prompts[i] for i in chunk], temperature, generator, base=base)
        records += score_records(parts, facts, list(chunk), batch, name)
        progress.advance(task, len(chunk))
    return records


class _StepBias:
    """HF logits processor applying the sampler's length masks and banned-token penalty, then
    renormalising: beam search then ranks by the same masked policy log P_F as the sampler."""

    def __init__(self, cfg: SamplerConfig, prompt_width: int) -> None:
        self.cfg, self.width = cfg, prompt_width

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        t = torch.tensor([input_ids.shape[1] - self.width], device=scores.device)
        bias = step_bias(self.cfg, t, scores.shape[-1])[0].to(scores.dtype)
        return torch.log_softmax(scores + bias, dim=-1)


def _generate_beams(
    lm: Any,
    ids: Tensor,
    mask: Tensor,
    common: dict[str, Any],
    processors: Any,
    groups: int,
    diversity_penalty: float,
) -> tuple[Tensor, bool]:
    """``lm.generate`` with group beam search when asked and available, else plain beam
    search; returns the sequences and whether group beam search ran."""
    n = common["num_beams"]
    if groups > 1 and n % groups == 0 and _DIVERSE_BEAM["ok"]:
        try:
            gen = GenerationConfig(
                **common, num_beam_groups=groups, diversity_penalty=diversity_penalty
            )
            out = lm.generate(
                input_ids=ids,
                attention_mask=mask,
                generation_config=gen,
                logits_processor=processors,
            )
            return out, True
        except (ValueError, OSError, ImportError) as exc:
            _DIVERSE_BEAM["ok"] = False  # do not retry (and warn) for every chunk
            log.warning(
                "diverse beam search unavailable (%s); using plain beam search", str(exc)[:200]
            )
    out = lm.generate(
        input_ids=ids,
        attention_mask=mask,
        generation_config=GenerationConfig(**common),
        logits_processor=processors,
    )
    return out, False


def beam_questions(
    parts: Parts,
    prompts: Sequence[Sequence[int]],
    n: int,
    groups: int = 1,
    diversity_penalty: float = 0.0,
) -> tuple[SampleBatch, bool]:
    """``n`` beams per prompt from the base LM (adapters disabled), cut at the termination
    token, as a SampleBatch of ``len(prompts) * n`` rows (row order: prompt-major).

    With ``groups > 1`` diverse (group) beam search is tried first; transformers 5 moved it to
    a hub repository (``trust_remote_code``), so offline it falls back to plain beam search.

    Returns:
        ``(batch, diverse)``: ``diverse`` says whether group beam search actually ran.
    """
    scfg = parts.sampler_cfg
    device = next(parts.policy.parameters()).device
    ids, mask = left_pad(prompts, scfg.pad_token_id, device)
    width = ids.shape[1]
    term = scfg.termination_token_id
    common = {
        "max_new_tokens": scfg.max_len,
        "do_sample": False,
        "num_beams": n,
        "num_return_sequences": n,
        "eos_token_id": term,
        "pad_token_id": scfg.pad_token_id,
    }
    processors = LogitsProcessorList([_StepBias(scfg, width)])
    with base_model(parts.sampler_lm()) as lm, torch.no_grad():
        out, diverse = _generate_beams(lm, ids, mask, common, processors, groups, diversity_penalty)
        seqs = [
            row[: row.index(term) + 1] if term in row else row[: scfg.max_len - 1] + [term]
            for row in out[:, width:].tolist()
        ]
        actions = right_pad(seqs, scfg.pad_token_id, device)
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long, device=device)
        rep_ids, rep_mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
        log_pf, log_pterm = score_actions(lm, rep_ids, rep_mask, actions, scfg)
    batch = SampleBatch(
        prompt_ids=rep_ids,
        prompt_mask=rep_mask,
        actions=actions,
        lengths=lengths,
        log_pf=log_pf.detach(),
        log_pterm=log_pterm.detach(),
    )
    return batch, diverse


def beam_records(
    parts: Parts,
    facts: Sequence[EditFact],
    prompts: Sequence[Sequence[int]],
    n: int,
    batch_size: int,
    groups: int,
    diversity_penalty: float,
    progress: Any,
) -> tuple[str, list[dict[str, Any]]]:
    """``n`` beams per fact, scored; the method is named ``diverse_beam`` when group beam
    search ran for every chunk, else ``beam``.

    Returns:
        ``(method name, records)``.
    """
    task = progress.add_task("beam", total=len(facts) * n)
    any_plain = False
    batches = []
    for chunk in chunks(list(range(len(facts))), max(1, batch_size // n)):
        batch, diverse = beam_questions(
            parts, [prompts[i] for i in chunk], n, groups, diversity_penalty
        )
        any_plain |= not diverse
        batches.append((chunk, batch))
        progress.advance(task, len(chunk) * n)
    name = "beam" if any_plain else "diverse_beam"
    records: list[dict[str, Any]] = []
    for chunk, batch in batches:
        records += score_records(parts, facts, [i for i in chunk for _ in range(n)], batch, name)
    return name, records
