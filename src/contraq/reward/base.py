"""What every reward shares: its output, its protocol, and the base LM's teacher-forced scores.

Every reward returns UNSCALED log-rewards; the training loop divides them by the scheduled
reward temperature (:meth:`contraq.config.schema.RewardTempConfig.at`).

Tensor conventions are those of docs/ARCHITECTURE.md: a :class:`~contraq.lm.sampling.SampleBatch`
holds left-padded prompts ``prompt_ids/prompt_mask [B, P]``, actions ``[B, T]`` (termination
token included, padding after it) and ``lengths [B]`` (termination included). The question of
row ``b`` is ``actions[b, :lengths[b]]``; its *length* for the min-length check is the number of
actions before the termination token (never a count of non-pad tokens: padding may be the
termination token itself).

The frozen base LM is the policy with its LoRA adapters disabled
(:func:`contraq.lm.models.base_model`), so the weights are held once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from contraq.lm.models import base_model
from contraq.lm.sampling import sampling_mode, teacher_forced_logits

if TYPE_CHECKING:
    from contraq.data import EditFact
    from contraq.lm.sampling import SampleBatch


@dataclass
class RewardOutput:
    """Terminal rewards of a batch of B questions.

    Attributes:
        log_r: ``FloatTensor[B]`` unscaled log-reward (finite: non-finite values are replaced
            by the reward's ``min_log_r``).
        components: ``name -> FloatTensor[B]``: ``log_pq``, ``length`` and ``n_nonfinite``
            (number of non-finite components of that row) always; ``log_c`` for the
            contradiction reward; ``log_pa`` when the answer likelihood is used. Non-finite
            component values are stored as ``min_log_r`` (counted in ``n_nonfinite``).
        answers: the base LM's answer per question (contradiction reward), else ``None``.
        questions: the decoded questions (termination token included).
    """

    log_r: Tensor
    components: dict[str, Tensor]
    answers: list[str] | None
    questions: list[str]

    def row_components(self, b: int) -> dict[str, float]:
        """Row ``b``'s per-row components (the ``FloatTensor[B]`` ones) as floats."""
        return {k: float(v[b]) for k, v in self.per_row_components().items()}

    def per_row_components(self) -> dict[str, Tensor]:
        """The components with one value per row (``FloatTensor[B]``)."""
        return {k: v for k, v in self.components.items() if torch.is_tensor(v) and v.dim() == 1}


class Reward(Protocol):
    """What the training loop needs from a reward."""

    def terminal(
        self, facts: Sequence[EditFact], batch: SampleBatch, step: int = 0
    ) -> RewardOutput:
        """Unscaled log-rewards of the B complete questions (``facts[b]`` belongs to row b)."""
        ...

    def prefixes(
        self, facts: Sequence[EditFact], batch: SampleBatch, step: int = 0, min_len: int = 0
    ) -> Tensor:
        """``FloatTensor[B, T]``: ``[b, t] = log R(s_t + term)`` unscaled for every state
        ``min_len <= t <= k_b`` (``k_b = lengths[b] - 1``, the termination step); 0 elsewhere."""
        ...


def question_lengths(actions: Tensor, lengths: Tensor, termination_token_id: int) -> Tensor:
    """Number of question tokens before termination.

    Args:
        actions: ``LongTensor[B, T]``.
        lengths: ``LongTensor[B]`` generated tokens, termination included.

    Returns:
        ``LongTensor[B]``: ``lengths - 1`` where the last generated token is the termination
        token, ``lengths`` otherwise (a question cut without it). Padding is never counted.
    """
    last = (lengths - 1).clamp(min=0)
    ends_with_term = actions.gather(1, last[:, None]).squeeze(1) == termination_token_id
    return lengths - (ends_with_term & (lengths > 0)).long()


def base_logprobs(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    actions: Tensor,
    lengths: Tensor,
    termination_token_id: int,
    batch_size: int = 0,
) -> tuple[Tensor, Tensor]:
    """One teacher-forced pass: log-probs of every action and of the termination token.

    Args:
        model: a causal LM (call it inside :func:`contraq.lm.models.base_model` for the base LM).
        prompt_ids, prompt_mask: ``LongTensor[B, P]``, left-padded.
        actions: ``LongTensor[B, T]``; positions ``t >= lengths[b]`` are padding (masked out
            of attention, their outputs set to 0).
        lengths: ``LongTensor[B]``.
        termination_token_id: the token whose log-prob is read at every state.
        batch_size: rows per forward pass (0: all at once), bounding the ``[b, T, V]`` logits.

    Returns:
        ``(tok_lp, term_lp)``, both ``FloatTensor[B, T]`` (float32):
        ``tok_lp[b, t] = log P(a_t | s_t)``, ``term_lp[b, t] = log P(term | s_t)``; 0 for
        ``t >= lengths[b]``.
    """
    n_rows, n_slots = actions.shape
    valid = torch.arange(n_slots, device=actions.device)[None, :] < lengths[:, None]
    step = batch_size if batch_size > 0 else max(n_rows, 1)
    tok_parts, term_parts = [], []
    for lo in range(0, n_rows, step):
        sl = slice(lo, lo + step)
        # Same pass (positions from the mask, logits of the action slots only) as the sampler's.
        logits, _ = teacher_forced_logits(
            model, prompt_ids[sl], prompt_mask[sl], actions[sl], valid[sl]
        )
        lse = logits.logsumexp(-1)
        tok_parts.append(logits.gather(-1, actions[sl, :, None]).squeeze(-1) - lse)
        term_parts.append(logits[..., termination_token_id] - lse)
    zero = torch.zeros((), device=actions.device)
    tok_lp = torch.where(valid, torch.cat(tok_parts), zero)
    term_lp = torch.where(valid, torch.cat(term_parts), zero)
    return tok_lp, term_lp


def distinct_rows(batch: SampleBatch) -> tuple[SampleBatch, Tensor]:
    """The distinct (prompt, question) rows of a batch (a trained policy repeats its questions).

    Returns:
        ``(rows, inverse)``: a :class:`~contraq.lm.sampling.SampleBatch` of the U distinct rows
        (``log_pf``/``log_pterm`` taken from the first row of each) and ``LongTensor[B]`` with
        row ``b`` of ``batch`` equal to row ``inverse[b]`` of ``rows``.
    """
    key = torch.cat(
        [batch.prompt_ids, batch.prompt_mask.to(batch.prompt_ids.dtype), batch.actions]
        + [batch.lengths[:, None].to(batch.prompt_ids.dtype)],
        dim=1,
    )
    index: dict[tuple[int, ...], int] = {}  # row -> its place among the distinct rows
    inverse = [index.setdefault(tuple(r), len(index)) for r in key.tolist()]
    keep = [inverse.index(u) for u in range(len(index))]  # each distinct row's first
    dev = batch.actions.device
    pick = torch.tensor(keep, device=dev)
    rows = type(batch)(**{k: getattr(batch, k)[pick] for k in batch.__dataclass_fields__})
    return rows, torch.tensor(inverse, device=dev)


def batch_logprobs(
    lm: nn.Module, batch: SampleBatch, termination_token_id: int, batch_size: int = 0
) -> tuple[Tensor, Tensor]:
    """:func:`base_logprobs` of a :class:`~contraq.lm.sampling.SampleBatch`, moved to ``lm``'s
    device, each distinct (prompt, question) row computed once and copied to its repeats:
    ``(tok_lp, term_lp)``, both ``FloatTensor[B, T]``."""
    dev = model_device(lm)
    rows, inverse = distinct_rows(batch) if len(batch) > 1 else (batch, None)
    tok_lp, term_lp = base_logprobs(
        lm,
        rows.prompt_ids.to(dev),
        rows.prompt_mask.to(dev),
        rows.actions.to(dev),
        rows.lengths.to(dev),
        termination_token_id,
        batch_size,
    )
    if inverse is None:
        return tok_lp, term_lp
    inverse = inverse.to(dev)
    return tok_lp[inverse], term_lp[inverse]


def prefix_log_pq(tok_lp: Tensor, term_lp: Tensor) -> Tensor:
    """``[B, T]``: ``log P(s_t + term) = sum_{j<t} tok_lp[j] + term_lp[t]`` (exclusive cumsum)."""
    return tok_lp.cumsum(1) - tok_lp + term_lp


def prefix_states(lengths: Tensor, n_slots: int, min_len: int) -> Tensor:
    """``BoolTensor[B, T]``: the states ``min_len <= t <= lengths - 1`` (prefix reward defined)."""
    t = torch.arange(n_slots, device=lengths.device)[None, :]
    return (t >= min_len) & (t < lengths[:, None])


@contextlib.contextmanager
def frozen_base(policy: nn.Module) -> Iterator[nn.Module]:
    """The base LM (adapters off) in eval mode (the KV cache stays on under gradient
    checkpointing) without autograd; every submodule's train flag is restored on exit."""
    with sampling_mode(policy), base_model(policy) as lm, torch.no_grad():
        yield lm


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def check_rows(facts: Sequence[Any], batch: SampleBatch, who: str) -> None:
    if len(facts) != batch.actions.shape[0]:
        raise ValueError(
            f"{who}: {len(facts)} facts for {batch.actions.shape[0]} questions "
            "(one fact per row expected)"
        )


def field_value(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def dataclass_from(cls: Any, cfg: Mapping[str, Any], where: str) -> Any:
    """``cls(**cfg)`` with nested mappings as dicts; an unknown key is a ValueError naming it."""
    known = {f.name for f in fields(cls)}
    kwargs = {}
    for key, value in cfg.items():
        if key not in known:
            raise ValueError(f"{where} config: unknown field {key!r} (known: {sorted(known)})")
        kwargs[key] = dict(value) if isinstance(value, Mapping) else value
    return cls(**kwargs)
