"""Rewards: the likelihood reward and the contradiction reward (DESIGN.md section 2).

Every reward returns UNSCALED log-rewards; the training loop divides them by the scheduled
reward temperature (:func:`reward_temperature`).

Tensor conventions are those of docs/ARCHITECTURE.md: a :class:`~contraq.sampler.SampleBatch`
holds left-padded prompts ``prompt_ids/prompt_mask [B, P]``, actions ``[B, T]`` (termination
token included, padding after it) and ``lengths [B]`` (termination included). The question of
row ``b`` is ``actions[b, :lengths[b]]``; its *length* for the min-length check is the number of
actions before the termination token (never a count of non-pad tokens: padding may be the
termination token itself).

The frozen base LM is the policy with its LoRA adapters disabled
(:func:`contraq.models.base_model`), so the weights are held once.

Costs (B questions, T action slots):

- :class:`LikelihoodReward`: one teacher-forced base-model pass for ``terminal`` and the same
  single pass for ``prefixes`` (exact for every prefix).
- :class:`ContradictionReward`: ``terminal`` = one batched greedy generation (answers), one
  batched NLI call and one teacher-forced pass. ``prefixes`` answers and judges every prefix
  ``s_t + term`` (``min_len <= t <= termination step``): about ``T`` times the terminal cost.
  Only modified SubTB needs it; Trajectory Balance uses the terminal reward alone.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from contraq.genuine import echo_flags, is_question
from contraq.models import base_model
from contraq.sampler import _teacher_forced, sampling_mode
from contraq.tokens import decode_questions, right_pad

if TYPE_CHECKING:
    from contraq.data import EditFact
    from contraq.judge.scorer import NLIScorer
    from contraq.sampler import SampleBatch

__all__ = [
    "AnswerPromptConfig",
    "ContradictionReward",
    "ContradictionRewardConfig",
    "LikelihoodReward",
    "Reward",
    "RewardOutput",
    "base_logprobs",
    "build_reward",
    "combine_log_reward",
    "counted_log_c",
    "first_line",
    "question_lengths",
    "reward_temperature",
]

DEFAULT_CHAT_TEXT = "Answer the question in one short declarative sentence.\nQuestion: {question}"
DEFAULT_FEWSHOT_TEXT = (
    "Answer each question with one short declarative sentence.\n"
    "Q: What is the capital of France?\n"
    "A: The capital of France is Paris.\n"
    "Q: Who wrote Hamlet?\n"
    "A: Hamlet was written by William Shakespeare.\n"
    "Q: Which company makes the iPhone?\n"
    "A: The iPhone is made by Apple.\n"
    "Q: {question}\n"
    "A:"
)


# --------------------------------------------------------------------------- protocol


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


def reward_temperature(step: int, start: float, end: float, horizon: int) -> float:
    """Reward temperature at ``step``: linear from ``start`` (step 0) to ``end`` (step
    ``horizon``), then ``end``. ``horizon <= 0`` means ``end`` from the first step."""
    if horizon <= 0 or step >= horizon:
        return float(end)
    frac = max(step, 0) / horizon
    return float(start + (end - start) * frac)


# --------------------------------------------------------------------------- pure helpers


def first_line(text: str) -> str:
    """An answer as kept: leading whitespace dropped, cut at the first newline, stripped."""
    return text.lstrip().split("\n", 1)[0].strip()


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


def _nonfinite_count(parts: Sequence[Tensor]) -> Tensor:
    return torch.stack([(~torch.isfinite(p)).float() for p in parts]).sum(0)


def combine_log_reward(
    log_c: Tensor,
    log_pq: Tensor,
    n_tokens: Tensor,
    *,
    w_lik: float,
    min_len: int,
    min_log_r: float,
    beta: float = 1.0,
    log_pa: Tensor | None = None,
    w_ans: float = 0.0,
    step: int = 0,
    hybrid_steps: int = 0,
    hybrid_threshold: float = 0.5,
    hybrid_penalty: float = 10.0,
) -> tuple[Tensor, Tensor]:
    """The contradiction log-reward from its parts (all ``FloatTensor[N]``).

    ``log R = log C / beta + w_lik * log P_Q (+ w_ans * log P_A)``; during the hybrid warm-up
    (``step < hybrid_steps``) ``log R = log P_Q - hybrid_penalty * [log C < log hybrid_threshold]``.
    Questions with ``n_tokens < min_len`` get ``min_log_r``; so does any row where a component
    or the result is NaN/inf (never raised).

    Returns:
        ``(log_r [N], n_nonfinite [N])``: the log-reward and the number of non-finite
        components per row.
    """
    parts = [log_c, log_pq] + ([log_pa] if log_pa is not None else [])
    n_nonfinite = _nonfinite_count(parts)
    if step < hybrid_steps:
        below = (log_c < math.log(hybrid_threshold)).to(log_pq.dtype)
        log_r = log_pq - hybrid_penalty * below
    else:
        log_r = log_c / beta + w_lik * log_pq
        if log_pa is not None and w_ans != 0.0:
            log_r = log_r + w_ans * log_pa
    floor = torch.full_like(log_r, float(min_log_r))
    log_r = torch.where(n_tokens.to(log_r.device) < min_len, floor, log_r)
    bad = (n_nonfinite > 0) | ~torch.isfinite(log_r)
    return torch.where(bad, floor, log_r), n_nonfinite


def counted_log_c(log_c: Tensor, genuine_form: Tensor, floor: float) -> Tensor:
    """``log C`` as the reward counts it: clamped below at ``floor``, and ``floor`` itself
    where the text is not a question or its answer is an echo.

    Args:
        log_c: ``FloatTensor[N]`` log P_NLI(contradiction | edit, answer).
        genuine_form: ``BoolTensor[N]``: a question whose answer is not an echo.
    """
    floor_t = torch.full_like(log_c, float(floor))
    return torch.where(genuine_form.to(log_c.device), torch.maximum(log_c, floor_t), floor_t)


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
        model: a causal LM (call it inside :func:`contraq.models.base_model` for the base LM).
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
        logits, _ = _teacher_forced(model, prompt_ids[sl], prompt_mask[sl], actions[sl], valid[sl])
        lse = logits.logsumexp(-1)
        tok_parts.append(logits.gather(-1, actions[sl, :, None]).squeeze(-1) - lse)
        term_parts.append(logits[..., termination_token_id] - lse)
    zero = torch.zeros((), device=actions.device)
    tok_lp = torch.where(valid, torch.cat(tok_parts), zero)
    term_lp = torch.where(valid, torch.cat(term_parts), zero)
    return tok_lp, term_lp


def _prefix_log_pq(tok_lp: Tensor, term_lp: Tensor) -> Tensor:
    """``[B, T]``: ``log P(s_t + term) = sum_{j<t} tok_lp[j] + term_lp[t]`` (exclusive cumsum)."""
    return tok_lp.cumsum(1) - tok_lp + term_lp


def _prefix_states(lengths: Tensor, n_slots: int, min_len: int) -> Tensor:
    """``BoolTensor[B, T]``: the states ``min_len <= t <= lengths - 1`` (prefix reward defined)."""
    t = torch.arange(n_slots, device=lengths.device)[None, :]
    return (t >= min_len) & (t < lengths[:, None])


@contextlib.contextmanager
def _frozen_base(policy: nn.Module) -> Iterator[nn.Module]:
    """The base LM (adapters off) in eval mode (the KV cache stays on under gradient
    checkpointing) without autograd; every submodule's train flag is restored on exit."""
    with sampling_mode(policy), base_model(policy) as lm, torch.no_grad():
        yield lm


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_rows(facts: Sequence[Any], batch: SampleBatch, who: str) -> None:
    if len(facts) != batch.actions.shape[0]:
        raise ValueError(
            f"{who}: {len(facts)} facts for {batch.actions.shape[0]} questions "
            "(one fact per row expected)"
        )


# --------------------------------------------------------------------------- likelihood reward


class LikelihoodReward:
    """``log R(x) = log P_base(x | prompt)``, termination included, padding excluded.

    Exact per prefix from ONE teacher-forced base pass:
    ``log R(s_t + term) = sum_{j<t} log P_base(a_j | s_j) + log P_base(term | s_t)``.
    """

    def __init__(
        self,
        policy: nn.Module,
        tokenizer: Any,
        termination_token_id: int,
        min_len: int = 0,
        min_log_r: float = -50.0,
        batch_size: int = 0,
    ) -> None:
        """
        Args:
            policy: the ``peft.PeftModel`` policy (its base is used, adapters disabled).
            tokenizer: decodes the questions.
            termination_token_id: id of the token ending a question.
            min_len: questions with fewer tokens before termination get ``min_log_r``.
            min_log_r: floor log-reward (also for non-finite values).
            batch_size: rows per forward pass (0: the whole batch).
        """
        self.policy = policy
        self.tokenizer = tokenizer
        self.term_id = int(termination_token_id)
        self.min_len = int(min_len)
        self.min_log_r = float(min_log_r)
        self.batch_size = int(batch_size)

    def _logprobs(self, batch: SampleBatch) -> tuple[Tensor, Tensor]:
        with _frozen_base(self.policy) as lm:
            dev = _model_device(lm)
            return base_logprobs(
                lm,
                batch.prompt_ids.to(dev),
                batch.prompt_mask.to(dev),
                batch.actions.to(dev),
                batch.lengths.to(dev),
                self.term_id,
                self.batch_size,
            )

    def _floor(self, log_r: Tensor, n_tokens: Tensor) -> tuple[Tensor, Tensor]:
        n_nonfinite = (~torch.isfinite(log_r)).float()
        floor = torch.full_like(log_r, self.min_log_r)
        log_r = torch.where((n_tokens < self.min_len) | (n_nonfinite > 0), floor, log_r)
        return log_r, n_nonfinite

    def terminal(
        self, facts: Sequence[EditFact], batch: SampleBatch, step: int = 0
    ) -> RewardOutput:
        """See :class:`Reward`; ``facts`` only fixes the batch size here."""
        _check_rows(facts, batch, type(self).__name__)
        tok_lp, _ = self._logprobs(batch)
        log_pq = tok_lp.sum(1)
        n_tok = question_lengths(
            batch.actions.to(log_pq.device), batch.lengths.to(log_pq.device), self.term_id
        )
        log_r, n_nonfinite = self._floor(log_pq, n_tok)
        clean_pq = torch.where(n_nonfinite > 0, torch.full_like(log_pq, self.min_log_r), log_pq)
        return RewardOutput(
            log_r=log_r,
            components={"log_pq": clean_pq, "length": n_tok.float(), "n_nonfinite": n_nonfinite},
            answers=None,
            questions=decode_questions(self.tokenizer, batch.actions, batch.lengths),
        )

    def prefixes(
        self, facts: Sequence[EditFact], batch: SampleBatch, step: int = 0, min_len: int = 0
    ) -> Tensor:
        """See :class:`Reward`. ``[b, t]`` is ``log P_base(a_<t, term | prompt)``; prefixes
        shorter than this reward's ``min_len`` get ``min_log_r``."""
        _check_rows(facts, batch, type(self).__name__)
        tok_lp, term_lp = self._logprobs(batch)
        lengths = batch.lengths.to(tok_lp.device)
        t = torch.arange(tok_lp.shape[1], device=tok_lp.device)[None, :].expand_as(tok_lp)
        log_r, _ = self._floor(_prefix_log_pq(tok_lp, term_lp), t)
        defined = _prefix_states(lengths, tok_lp.shape[1], min_len)
        return torch.where(defined, log_r, torch.zeros_like(log_r))


# --------------------------------------------------------------------------- contradiction reward


@dataclass
class AnswerPromptConfig:
    """How the base LM is asked to answer a question (``{question}`` is replaced).

    Attributes:
        style: ``chat`` (through the tokenizer's chat template: instruct LMs), ``fewshot``
            (raw text with Q:/A: examples: raw LMs) or ``auto`` (chat when the tokenizer has a
            chat template).
        chat_template_text: the user message for ``chat``.
        fewshot_text: the whole prompt for ``fewshot``, ending where the answer starts.
    """

    style: str = "auto"
    chat_template_text: str = DEFAULT_CHAT_TEXT
    fewshot_text: str = DEFAULT_FEWSHOT_TEXT


@dataclass
class ContradictionRewardConfig:
    """Keys of ``configs/reward/contradiction.yaml`` read by :class:`ContradictionReward`.

    Attributes:
        w_lik: weight of ``log P_Q``. 1.0 by default: the GFlowNet target is then the posterior
            ``P_base(x) * C(x)``, the base LM's questions re-weighted by contradiction. A small
            weight makes the target nearly flat over all token strings (gibberish wins by sheer
            number: with 0.05, log P_Q fell from -66 to -120 nats in 20 steps).
        w_ans: weight of the answer's log-likelihood (0: not computed).
        min_len: questions with fewer tokens before termination get ``min_log_r``.
        min_log_r: floor log-reward (min-length and non-finite rows).
        hybrid_steps: warm-up steps with
            ``log R = log P_Q - hybrid_penalty * [C < hybrid_threshold]``.
        hybrid_threshold: contradiction probability under which the warm-up penalty applies.
        hybrid_penalty: the warm-up penalty (nats).
        beta: contradiction sharpness: ``log C`` enters the reward as ``log C / beta``
            (GFlowNet red-teaming uses 0.1, i.e. a target ``C^10 * P_base``).
        count_only_genuine: give no contradiction credit (``log C = log_c_floor``) to
            non-questions and echoes (:mod:`contraq.genuine`).
        judge_question: also judge the question itself against the edit: a question that
            already contradicts it is an echo (one more NLI call per distinct question).
        log_c_floor: lower bound of ``log C`` (and its value for non-questions and echoes):
            with ``beta < 1`` an unbounded ``log C`` of a clear neutral would swamp the prior.
        answer_prompt: see :class:`AnswerPromptConfig`.
        answer_max_new_tokens: greedy answer length cap.
        batch_size: questions per generation / forward chunk (prefix rewards are flattened
            into chunks of this size).
    """

    w_lik: float = 1.0
    w_ans: float = 0.0
    min_len: int = 0
    min_log_r: float = -50.0
    hybrid_steps: int = 0
    hybrid_threshold: float = 0.5
    hybrid_penalty: float = 10.0
    beta: float = 1.0
    count_only_genuine: bool = True
    judge_question: bool = True
    log_c_floor: float = -6.907755  # log(0.001)
    answer_prompt: AnswerPromptConfig = field(default_factory=AnswerPromptConfig)
    answer_max_new_tokens: int = 30
    batch_size: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.answer_prompt, Mapping):
            self.answer_prompt = _dataclass_from(
                AnswerPromptConfig, self.answer_prompt, "answer_prompt"
            )
        ap = self.answer_prompt
        checks = [
            (math.isfinite(self.w_lik), "w_lik", "must be finite"),
            (math.isfinite(self.w_ans), "w_ans", "must be finite"),
            (math.isfinite(self.min_log_r), "min_log_r", "must be finite"),
            (math.isfinite(self.beta) and self.beta > 0, "beta", "must be > 0"),
            (
                math.isfinite(self.log_c_floor) and self.log_c_floor < 0,
                "log_c_floor",
                "must be finite and < 0",
            ),
            (self.min_len >= 0, "min_len", "must be >= 0"),
            (self.hybrid_steps >= 0, "hybrid_steps", "must be >= 0"),
            (0.0 < self.hybrid_threshold <= 1.0, "hybrid_threshold", "must be in (0, 1]"),
            (self.answer_max_new_tokens >= 1, "answer_max_new_tokens", "must be >= 1"),
            (self.batch_size >= 1, "batch_size", "must be >= 1"),
            (
                ap.style in ("auto", "chat", "fewshot"),
                "answer_prompt.style",
                "expected auto, chat or fewshot",
            ),
            (
                "{question}" in ap.chat_template_text,
                "answer_prompt.chat_template_text",
                "must contain {question}",
            ),
            (
                "{question}" in ap.fewshot_text,
                "answer_prompt.fewshot_text",
                "must contain {question}",
            ),
        ]
        for ok, name, why in checks:
            if not ok:
                raise ValueError(f"reward config field {name}={_field_value(self, name)!r}: {why}")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> ContradictionRewardConfig:
        """From a (Hydra) mapping; ``name`` and the reward-temperature keys (read by the
        training loop) are ignored, any other unknown key is an error naming it."""
        return _dataclass_from(cls, cfg, "reward", ignore=_LOOP_KEYS)


_LOOP_KEYS = frozenset({"name", "reward_temp_start", "reward_temp_end", "reward_temp_horizon"})


def _field_value(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _dataclass_from(
    cls: Any, cfg: Mapping[str, Any], where: str, ignore: frozenset[str] = frozenset()
) -> Any:
    known = {f.name for f in fields(cls)}
    kwargs = {}
    for key, value in cfg.items():
        if key in ignore:
            continue
        if key not in known:
            raise ValueError(f"{where} config: unknown field {key!r} (known: {sorted(known)})")
        kwargs[key] = dict(value) if isinstance(value, Mapping) else value
    return cls(**kwargs)


class _NewlineStop(StoppingCriteria):
    """Stops a row once its answer (leading whitespace dropped) contains a newline: the rest
    would be cut anyway, and finished rows are padded by ``generate``."""

    def __init__(self, tokenizer: Any, prompt_width: int) -> None:
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs: Any) -> Tensor:
        texts = self.tokenizer.batch_decode(
            input_ids[:, self.prompt_width :], skip_special_tokens=True
        )
        done = ["\n" in t.lstrip() for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@dataclass
class _Judged:
    """What :meth:`ContradictionReward._judge` finds for N (fact, question) rows."""

    answers: list[str]
    log_c: Tensor  # [N] raw judge log P(contradiction | edit, answer)
    log_pa: Tensor | None  # [N] or None
    question: Tensor  # [N] bool: the text is a question (contraq.genuine.is_question)
    echo: Tensor  # [N] bool: the answer's contradicting content was already in the question


class ContradictionReward:
    """``log R(x) = log C(x) / beta + w_lik * log P_Q(x) [+ w_ans * log P_A(x)]`` (DESIGN.md
    section 2), with ``log C`` as :func:`counted_log_c` counts it (non-questions and echoes get
    ``log_c_floor``; ``count_only_genuine: false`` only clamps).

    - answer ``a(x)``: the frozen base LM, greedy, batched with LEFT padding, cut at the first
      newline (:func:`first_line`);
    - ``log C = log P_NLI(contradiction | premise = fact.edit_fact, hypothesis = a(x))``;
    - ``log P_Q``: base-LM log-prob of the question tokens (termination included) given the
      question prompt the policy saw;
    - ``log P_A``: base-LM log-prob of the answer tokens as generated (cut before the newline)
      given the answer prompt; computed only when ``w_ans != 0``.

    Identical question texts are answered once, identical (fact, answer) pairs judged once
    (greedy decoding is deterministic), which matters for ``prefixes``: rows often share
    prefixes.
    """

    def __init__(
        self,
        policy: nn.Module,
        tokenizer: Any,
        nli: NLIScorer,
        cfg: ContradictionRewardConfig | Mapping[str, Any],
        termination_token_id: int,
    ) -> None:
        """
        Args:
            policy: the ``peft.PeftModel`` policy (its base answers and scores, adapters off).
            tokenizer: the policy's tokenizer (must have a pad token).
            nli: the NLI judge.
            cfg: a :class:`ContradictionRewardConfig` or its mapping.
            termination_token_id: id of the token ending a question.
        """
        self.policy = policy
        self.tokenizer = tokenizer
        self.nli = nli
        self.cfg = (
            cfg
            if isinstance(cfg, ContradictionRewardConfig)
            else ContradictionRewardConfig.from_mapping(cfg)
        )
        self.term_id = int(termination_token_id)
        style = self.cfg.answer_prompt.style
        if style == "auto":
            style = "chat" if getattr(tokenizer, "chat_template", None) else "fewshot"
        if style == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"reward config field answer_prompt.style='chat': tokenizer "
                f"{getattr(tokenizer, 'name_or_path', '?')!r} has no chat template (use fewshot)"
            )
        self.answer_style = style
        self.pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        if self.pad_id is None:
            raise ValueError(
                "ContradictionReward: the tokenizer has neither a pad nor an eos token"
            )
        # Answers continue the prompt: pad on the LEFT (tests flip this to show that right
        # padding changes the answers).
        self.padding_side = "left"

    # ------------------------------------------------------------------ answers
    def answer_prompt(self, question: str) -> str:
        """The answer prompt text for one question."""
        ap = self.cfg.answer_prompt
        if self.answer_style == "chat":
            msg = ap.chat_template_text.replace("{question}", question)
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": msg}], add_generation_prompt=True, tokenize=False
            )
        return ap.fewshot_text.replace("{question}", question)

    def _encode(self, texts: Sequence[str], device: torch.device) -> tuple[Tensor, Tensor]:
        # The chat template already holds its special tokens.
        old = self.tokenizer.padding_side
        self.tokenizer.padding_side = self.padding_side
        try:
            enc = self.tokenizer(
                list(texts),
                return_tensors="pt",
                padding=True,
                add_special_tokens=self.answer_style == "fewshot",
            )
        finally:
            self.tokenizer.padding_side = old
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

    def _answer_ids(self, new_ids: list[int]) -> list[int]:
        """The generated tokens the kept answer came from: up to the first special token or
        the token that brings a newline into the (left-stripped) text."""
        special = set(self.tokenizer.all_special_ids)
        kept: list[int] = []
        for tok in new_ids:
            if tok in special:
                break
            text = self.tokenizer.decode(kept + [tok], skip_special_tokens=True)
            if "\n" in text.lstrip():
                break
            kept.append(tok)
        return kept

    def generate_answers(
        self, questions: Sequence[str], lm: nn.Module
    ) -> tuple[list[str], list[list[int]]]:
        """Greedy answers of ``lm`` (call with the base LM), ``batch_size`` questions per
        ``generate`` call, left-padded.

        Returns:
            ``(answers, answer_token_ids)``: the kept answer text per question and the
            generated token ids it came from (for ``log P_A``).
        """
        cfg = self.cfg
        device = _model_device(lm)
        gen_cfg = GenerationConfig(
            max_new_tokens=cfg.answer_max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=self.pad_id,
            eos_token_id=getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
            or self.tokenizer.eos_token_id,
        )
        answers: list[str] = []
        answer_ids: list[list[int]] = []
        prompts = [self.answer_prompt(q) for q in questions]
        for lo in range(0, len(prompts), cfg.batch_size):
            ids, mask = self._encode(prompts[lo : lo + cfg.batch_size], device)
            out = lm.generate(
                input_ids=ids,
                attention_mask=mask,
                generation_config=gen_cfg,
                stopping_criteria=StoppingCriteriaList(
                    [_NewlineStop(self.tokenizer, ids.shape[1])]
                ),
            )
            new = out[:, ids.shape[1] :].tolist()
            texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
            answers += [first_line(t) for t in texts]
            if cfg.w_ans != 0.0:
                answer_ids += [self._answer_ids(row) for row in new]
        return answers, answer_ids

    def _answer_logprob(
        self, questions: Sequence[str], answer_ids: Sequence[list[int]], lm: nn.Module
    ) -> Tensor:
        """``FloatTensor[N]``: ``log P_base(answer tokens | answer prompt)``."""
        device = _model_device(lm)
        ids, mask = self._encode([self.answer_prompt(q) for q in questions], device)
        width = max((len(a) for a in answer_ids), default=0)
        if width == 0:
            return torch.zeros(len(questions), device=device)
        acts = right_pad(answer_ids, self.pad_id, device)
        lengths = torch.tensor([len(a) for a in answer_ids], device=device)
        tok_lp, _ = base_logprobs(lm, ids, mask, acts, lengths, self.term_id, self.cfg.batch_size)
        return tok_lp.sum(1)

    def _log_contradiction(
        self, premises: Sequence[str], hyps: Sequence[str], device: Any
    ) -> Tensor:
        """``FloatTensor[N]`` judge log P(contradiction), each distinct pair judged once."""
        pairs = list(dict.fromkeys(zip(premises, hyps, strict=True)))
        uniq = self.nli.log_contradiction([p for p, _ in pairs], [h for _, h in pairs])
        idx = {p: i for i, p in enumerate(pairs)}
        rows = [idx[p] for p in zip(premises, hyps, strict=True)]
        return uniq.to(device)[torch.tensor(rows, device=device, dtype=torch.long)].float()

    def _judge(self, edit_facts: Sequence[str], questions: Sequence[str], lm: nn.Module) -> _Judged:
        """Answers, judge scores and the genuine-form flags of (fact, question) pairs, each
        distinct question answered once and each distinct (fact, text) pair judged once."""
        uniq_q = list(dict.fromkeys(questions))
        ans, ans_ids = self.generate_answers(uniq_q, lm)
        by_q = dict(zip(uniq_q, range(len(uniq_q)), strict=True))
        answers = [ans[by_q[q]] for q in questions]
        device = _model_device(lm)
        log_c = self._log_contradiction(edit_facts, answers, device)
        question = torch.tensor([is_question(q) for q in questions], device=device)
        echo = torch.tensor(echo_flags(questions, answers, edit_facts), device=device)
        if self.cfg.judge_question and questions:
            # A question that already contradicts the edit leads the answer: an echo too.
            echo |= self._log_contradiction(edit_facts, questions, device) > math.log(0.5)
        log_pa = None
        if self.cfg.w_ans != 0.0:
            uniq_pa = self._answer_logprob(uniq_q, ans_ids, lm)
            log_pa = uniq_pa[
                torch.tensor([by_q[q] for q in questions], device=device, dtype=torch.long)
            ]
        return _Judged(answers, log_c, log_pa, question, echo)

    def _counted(self, judged: _Judged) -> Tensor:
        """``log C`` as the reward counts it (:func:`counted_log_c`)."""
        if not self.cfg.count_only_genuine:
            return judged.log_c.clamp(min=self.cfg.log_c_floor)
        return counted_log_c(judged.log_c, judged.question & ~judged.echo, self.cfg.log_c_floor)

    # ------------------------------------------------------------------ rewards
    def _combine(
        self, log_c: Tensor, log_pq: Tensor, n_tok: Tensor, log_pa: Tensor | None, step: int
    ) -> tuple[Tensor, Tensor]:
        c = self.cfg
        return combine_log_reward(
            log_c,
            log_pq,
            n_tok,
            w_lik=c.w_lik,
            min_len=c.min_len,
            min_log_r=c.min_log_r,
            beta=c.beta,
            log_pa=log_pa,
            w_ans=c.w_ans,
            step=step,
            hybrid_steps=c.hybrid_steps,
            hybrid_threshold=c.hybrid_threshold,
            hybrid_penalty=c.hybrid_penalty,
        )

    def terminal(
        self, facts: Sequence[EditFact], batch: SampleBatch, step: int = 0
    ) -> RewardOutput:
        """See :class:`Reward`: one batched generation per ``batch_size`` questions, one NLI
        call, one teacher-forced pass."""
        _check_rows(facts, batch, type(self).__name__)
        questions = decode_questions(self.tokenizer, batch.actions, batch.lengths)
        with _frozen_base(self.policy) as lm:
            dev = _model_device(lm)
            actions, lengths = batch.actions.to(dev), batch.lengths.to(dev)
            tok_lp, _ = base_logprobs(
                lm,
                batch.prompt_ids.to(dev),
                batch.prompt_mask.to(dev),
                actions,
                lengths,
                self.term_id,
                self.cfg.batch_size,
            )
            judged = self._judge([f.edit_fact for f in facts], questions, lm)
        log_c, log_pa = judged.log_c, judged.log_pa
        log_pq = tok_lp.sum(1)
        n_tok = question_lengths(actions, lengths, self.term_id)
        log_r, n_nonfinite = self._combine(self._counted(judged), log_pq, n_tok, log_pa, step)
        floor = self.cfg.min_log_r
        log_c = torch.nan_to_num(log_c, nan=floor, posinf=floor, neginf=floor)
        components = {
            "log_c": log_c,
            "log_pq": torch.nan_to_num(log_pq, nan=floor, posinf=floor, neginf=floor),
            "length": n_tok.float(),
            "n_nonfinite": n_nonfinite,
            "is_question": judged.question.float(),
            "is_echo": judged.echo.float(),
            "genuine": (judged.question & ~judged.echo & (log_c > math.log(0.5))).float(),
        }
        if log_pa is not None:
            components["log_pa"] = torch.nan_to_num(log_pa, nan=floor, posinf=floor, neginf=floor)
        return RewardOutput(
            log_r=log_r, components=components, answers=judged.answers, questions=questions
        )

    def prefixes(
        self, facts: Sequence[EditFact], batch: SampleBatch, step: int = 0, min_len: int = 0
    ) -> Tensor:
        """See :class:`Reward`. Every prefix ``s_t + term`` (``min_len <= t <= k``) is decoded,
        answered and judged: exact for modified SubTB, and about ``T`` times the cost of
        :meth:`terminal` (distinct prefixes are answered ``batch_size`` at a time; one NLI
        call; ``log P_Q`` of all prefixes from one teacher-forced pass)."""
        _check_rows(facts, batch, type(self).__name__)
        with _frozen_base(self.policy) as lm:
            dev = _model_device(lm)
            actions, lengths = batch.actions.to(dev), batch.lengths.to(dev)
            tok_lp, term_lp = base_logprobs(
                lm,
                batch.prompt_ids.to(dev),
                batch.prompt_mask.to(dev),
                actions,
                lengths,
                self.term_id,
                self.cfg.batch_size,
            )
            defined = _prefix_states(lengths, actions.shape[1], min_len)
            rows, ts = defined.nonzero(as_tuple=True)
            acts = actions.tolist()
            texts = self.tokenizer.batch_decode(
                [
                    acts[b][:t] + [self.term_id]
                    for b, t in zip(rows.tolist(), ts.tolist(), strict=True)
                ],
                skip_special_tokens=True,
            )
            questions = [q.strip() for q in texts]
            edit_facts = [facts[b].edit_fact for b in rows.tolist()]
            judged = self._judge(edit_facts, questions, lm) if questions else None
        out = torch.zeros(actions.shape, dtype=torch.float32, device=dev)
        if judged is None:
            return out
        log_pq = _prefix_log_pq(tok_lp, term_lp)[rows, ts]
        log_r, _ = self._combine(self._counted(judged), log_pq, ts, judged.log_pa, step)
        out[rows, ts] = log_r
        return out


# --------------------------------------------------------------------------- factory


def build_reward(
    cfg: Mapping[str, Any],
    policy: nn.Module,
    tokenizer: Any,
    termination_token_id: int,
    nli: NLIScorer | None = None,
) -> Reward:
    """The reward named by ``cfg.name`` (``configs/reward/*.yaml``).

    Args:
        cfg: the ``reward`` config group: ``name: contradiction`` (keys of
            :class:`ContradictionRewardConfig`) or ``name: likelihood`` (``min_len``,
            ``min_log_r``, ``batch_size``). The reward-temperature keys belong to the training loop.
        policy: the ``peft.PeftModel`` policy.
        nli: the NLI judge, required by the contradiction reward.

    Raises:
        ValueError: unknown name, missing judge, or a bad field (named).
    """
    name = cfg.get("name")
    if name == "contradiction":
        if nli is None:
            raise ValueError("reward config name='contradiction' needs an NLIScorer (nli=...)")
        return ContradictionReward(policy, tokenizer, nli, cfg, termination_token_id)
    if name == "likelihood":
        unknown = set(cfg.keys()) - _LOOP_KEYS - {"min_len", "min_log_r", "batch_size"}
        if unknown:
            raise ValueError(f"reward config (likelihood): unknown field(s) {sorted(unknown)}")
        return LikelihoodReward(
            policy,
            tokenizer,
            termination_token_id,
            min_len=int(cfg.get("min_len", 0)),
            min_log_r=float(cfg.get("min_log_r", -50.0)),
            batch_size=int(cfg.get("batch_size", 0)),
        )
    raise ValueError(f"reward config field name={name!r}: expected 'contradiction' or 'likelihood'")
