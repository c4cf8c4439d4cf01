"""The contradiction reward: judge the base LM's answer to a question against the edit fact.

Cost: ``terminal`` = one batched greedy generation (answers), one batched NLI call and one
teacher-forced pass. ``prefixes`` answers and judges every prefix ``s_t + term``
(``min_len <= t <= termination step``): about ``T`` times the terminal cost. Only modified
SubTB needs it; Trajectory Balance uses the terminal reward alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from contraq.genuine import echo_flags, is_question, mentions_subject, names_subject
from contraq.lm.tokens import decode_questions
from contraq.reward.answers import AnswerPromptConfig, BaseLMAnswers
from contraq.reward.base import (
    RewardOutput,
    batch_logprobs,
    check_rows,
    dataclass_from,
    field_value,
    frozen_base,
    model_device,
    prefix_log_pq,
    prefix_states,
    question_lengths,
)
from contraq.reward.combine import combine_log_reward, counted_log_c
from contraq.reward.frozen_weights import FROZEN_WEIGHTS, frozen_copy, resolve_frozen_weights

if TYPE_CHECKING:
    from contraq.data import EditFact
    from contraq.judge.scorer import NLIScorer
    from contraq.lm.embedding import Embedder
    from contraq.lm.sampling import SampleBatch


# Which questions earn the novelty term (ContradictionRewardConfig.div_gate), and which
# answers can earn contradiction credit (answer_gate).
DIV_GATES = ("none", "subject")
ANSWER_GATES = ("none", "subject")


def novelty_credit(
    novelty: Tensor, questions: Sequence[str], subjects: Sequence[str], gate: str
) -> Tensor:
    """``FloatTensor[N]``: the novelty that the reward pays, ``novelty`` (``[N]``) where the
    ``gate`` lets a question through and 0 elsewhere (``gate`` one of :data:`DIV_GATES`)."""
    if gate == "none":
        return novelty
    if gate != "subject":
        raise ValueError(f"div_gate={gate!r}: expected {' or '.join(DIV_GATES)}")
    named = [names_subject(q, s) for q, s in zip(questions, subjects, strict=True)]
    return novelty * torch.tensor(named, dtype=novelty.dtype, device=novelty.device)


@dataclass
class ContradictionRewardConfig:
    """Keys of ``configs/reward/contradiction.yaml`` read by :class:`ContradictionReward`.

    Attributes:
        w_lik: weight of ``log P_Q``. 1.0 by default: the GFlowNet target is then the posterior
            ``P_base(x) * C(x)``, the base LM's questions re-weighted by contradiction. A small
            weight makes the target nearly flat over all token strings (gibberish wins by sheer
            number: with 0.05, log P_Q fell from -66 to -120 nats in 20 steps).
        w_ans: weight of the answer's log-likelihood (0: not computed).
        w_div: weight of the question's novelty among the batch's questions for the same edit
            fact (:func:`contraq.lm.embedding.group_novelty` of all-MiniLM-L6-v2 embeddings; 0: not
            computed). The term depends on the other questions of the batch, so it is no fixed
            reward: it pushes the policy away from one question per fact. Replayed questions
            keep the log R of the batch they were sampled in. Not with ``loss=subtb``.
        w_share: reward sharing among a step's counted contradictions of one edit fact: a
            counted question's log R loses ``w_share * log k``, k the counted questions of its
            fact in the step (itself included) in its meaning cluster
            (:func:`contraq.lm.embedding.cluster_crowding`: MiniLM, average linkage, cosine 0.8).
            So the policy gains by spreading over probes rather than phrasings of one: with k
            draws of one cluster each keeps ``1 / k**w_share`` of its reward (fitness sharing).
            Like ``w_div`` it depends on the batch, so replayed questions keep the log R of the
            batch they were sampled in. Not with ``loss=subtb``. 0: off.
        div_gate: which questions earn the novelty term: ``none`` every question, ``subject``
            only questions that name the edit's subject (:func:`contraq.genuine.names_subject`).
            Ungated, the cheapest novelty is a question about some other subject.
        answer_gate: which answers can earn contradiction credit: ``none`` every answer,
            ``subject`` only answers that name a content word of the edit's subject
            (:func:`contraq.genuine.mentions_subject`); the others get ``log_c_floor`` like an
            echo. The judge counts some answers about nothing ("How many ... ?" -> "The answer
            to this question is 10."), and a policy can learn to ask for them. Reward only:
            what the eval counts does not change.
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
        frozen_weights: the weights the answers and log P_Q run on
            (:mod:`contraq.reward.frozen_weights`): ``shared`` the policy's own (adapters off),
            ``float16`` / ``int8`` a CPU copy of the base with float16 / int8 ``nn.Linear``
            weights, ``auto`` ``float16`` for a float32 model on the CPU, else ``shared``.
    """

    name: str = "contradiction"
    w_lik: float = 1.0
    w_ans: float = 0.0
    w_div: float = 0.0
    w_share: float = 0.0
    div_gate: str = "none"
    answer_gate: str = "none"
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
    frozen_weights: str = "shared"

    def __post_init__(self) -> None:
        if isinstance(self.answer_prompt, Mapping):
            self.answer_prompt = dataclass_from(
                AnswerPromptConfig, self.answer_prompt, "answer_prompt"
            )
        ap = self.answer_prompt
        checks = [
            (math.isfinite(self.w_lik), "w_lik", "must be finite"),
            (math.isfinite(self.w_ans), "w_ans", "must be finite"),
            (math.isfinite(self.w_div) and self.w_div >= 0, "w_div", "must be finite and >= 0"),
            (
                math.isfinite(self.w_share) and self.w_share >= 0,
                "w_share",
                "must be finite and >= 0",
            ),
            (self.div_gate in DIV_GATES, "div_gate", f"expected {' or '.join(DIV_GATES)}"),
            (
                self.answer_gate in ANSWER_GATES,
                "answer_gate",
                f"expected {' or '.join(ANSWER_GATES)}",
            ),
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
                self.frozen_weights in FROZEN_WEIGHTS,
                "frozen_weights",
                f"expected {', '.join(FROZEN_WEIGHTS)}",
            ),
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
                raise ValueError(f"reward config field {name}={field_value(self, name)!r}: {why}")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> ContradictionRewardConfig:
        """From a mapping (a DictConfig composed on this schema, or plain); an unknown key
        is an error naming it."""
        return dataclass_from(cls, cfg, "reward")


def log_contradiction(
    nli: NLIScorer, premises: Sequence[str], hyps: Sequence[str], device: Any
) -> Tensor:
    """``FloatTensor[N]`` judge log P(contradiction), each distinct pair judged once."""
    pairs = list(dict.fromkeys(zip(premises, hyps, strict=True)))
    uniq = nli.log_contradiction([p for p, _ in pairs], [h for _, h in pairs])
    idx = {p: i for i, p in enumerate(pairs)}
    rows = [idx[p] for p in zip(premises, hyps, strict=True)]
    return uniq.to(device)[torch.tensor(rows, device=device, dtype=torch.long)].float()


def judge_answers(
    nli: NLIScorer,
    edit_facts: Sequence[str],
    questions: Sequence[str],
    answers: Sequence[str],
    judge_question: bool,
    device: Any = "cpu",
) -> tuple[Tensor, Tensor, Tensor]:
    """The judge's verdict on N (edit fact, question, answer) rows (the reward's and
    `contraq rescore`'s one definition).

    Returns:
        ``(log_c, question, echo)``: ``FloatTensor[N]`` log P(contradiction | edit, answer);
        ``BoolTensor[N]`` the text is a question (:func:`contraq.genuine.is_question`);
        ``BoolTensor[N]`` the answer is an echo (:func:`contraq.genuine.echo_flags`, and with
        ``judge_question`` also a question the judge already finds contradictory).
    """
    log_c = log_contradiction(nli, edit_facts, answers, device)
    question = torch.tensor([is_question(q) for q in questions], device=device, dtype=torch.bool)
    echo = torch.tensor(echo_flags(questions, answers, edit_facts), device=device, dtype=torch.bool)
    if judge_question and questions:
        # A question that already contradicts the edit leads the answer: an echo too.
        echo |= log_contradiction(nli, edit_facts, questions, device) > math.log(0.5)
    return log_c, question, echo


def counted_flags(log_c: Tensor, question: Tensor, echo: Tensor) -> Tensor:
    """``BoolTensor[N]``: counted (genuine) contradictions: a question, no echo, and the judge's
    P(contradiction) above one half."""
    return question & ~echo & (log_c > math.log(0.5))


def counted_log_r(
    cfg: ContradictionRewardConfig,
    log_c: Tensor,
    form_ok: Tensor,
    log_pq: Tensor,
    n_tok: Tensor,
    log_pa: Tensor | None = None,
    step: int = 0,
    novelty: Tensor | None = None,
    crowding: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``log R`` of N judged questions under ``cfg`` (:func:`counted_log_c`, then
    :func:`combine_log_reward`): ``log_c`` the judge's, ``form_ok`` a question whose answer is
    no echo, ``n_tok`` tokens before termination, ``novelty`` each question's
    :func:`contraq.lm.embedding.group_novelty` (needed when ``cfg.w_div != 0``), ``crowding``
    :func:`contraq.lm.embedding.cluster_crowding` (needed when ``cfg.w_share != 0``). Returns
    ``(log_r, n_nonfinite)``, ``[N]``."""
    if cfg.w_div != 0.0 and novelty is None:
        raise ValueError("reward.w_div != 0 needs each question's novelty")
    if cfg.w_share != 0.0 and crowding is None:
        raise ValueError("reward.w_share != 0 needs each question's crowding")
    if cfg.count_only_genuine:
        counted = counted_log_c(log_c, form_ok, cfg.log_c_floor)
    else:
        counted = log_c.clamp(min=cfg.log_c_floor)
    return combine_log_reward(
        counted,
        log_pq,
        n_tok,
        w_lik=cfg.w_lik,
        min_len=cfg.min_len,
        min_log_r=cfg.min_log_r,
        beta=cfg.beta,
        log_pa=log_pa,
        w_ans=cfg.w_ans,
        novelty=novelty,
        w_div=cfg.w_div,
        crowding=crowding,
        w_share=cfg.w_share,
        step=step,
        hybrid_steps=cfg.hybrid_steps,
        hybrid_threshold=cfg.hybrid_threshold,
        hybrid_penalty=cfg.hybrid_penalty,
    )


@dataclass
class _Judged:
    """What :meth:`ContradictionReward._judge` finds for N (fact, question) rows."""

    answers: list[str]
    log_c: Tensor  # [N] raw judge log P(contradiction | edit, answer)
    log_pa: Tensor | None  # [N] or None
    question: Tensor  # [N] bool: the text is a question (contraq.genuine.is_question)
    echo: Tensor  # [N] bool: the answer's contradicting content was already in the question
    gated: Tensor  # [N] bool: the answer passes reward.answer_gate (all True for none)


class ContradictionReward(BaseLMAnswers):
    """``log R(x) = log C(x) / beta + w_lik * log P_Q(x) [+ w_ans * log P_A(x)]
    [+ w_div * novelty(x)] [- w_share * log crowding(x)]`` (docs/DESIGN.md section 2), with ``log C`` as :func:`counted_log_c`
    counts it (non-questions and echoes get ``log_c_floor``; ``count_only_genuine: false`` only
    clamps).

    - answer ``a(x)``: the frozen base LM, greedy, batched with LEFT padding, cut at the first
      newline (:func:`first_line`);
    - ``log C = log P_NLI(contradiction | premise = fact.edit_fact, hypothesis = a(x))``;
    - ``log P_Q``: base-LM log-prob of the question tokens (termination included) given the
      question prompt the policy saw;
    - ``log P_A``: base-LM log-prob of the answer tokens as generated (cut before the newline)
      given the answer prompt; computed only when ``w_ans != 0``;
    - ``novelty``: :meth:`novelty`, computed only when ``w_div != 0``;
    - ``crowding``: :meth:`crowding`, computed only when ``w_share != 0``.

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
        embedder: Embedder | None = None,
    ) -> None:
        """
        Args:
            policy: the ``peft.PeftModel`` policy (its base answers and scores, adapters off).
            tokenizer: the policy's tokenizer (must have a pad token).
            nli: the NLI judge.
            cfg: a :class:`ContradictionRewardConfig` or its mapping.
            termination_token_id: id of the token ending a question.
            embedder: the sentence embedder of the novelty and sharing terms (required when
                ``cfg.w_div != 0`` or ``cfg.w_share != 0``).
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
        if (self.cfg.w_div != 0.0 or self.cfg.w_share != 0.0) and embedder is None:
            raise ValueError("reward config field w_div or w_share != 0 needs a sentence embedder")
        self.embedder = embedder
        self._setup_answers(tokenizer)
        self._copies: dict[str, nn.Module] = {}  # frozen_weights -> the base's copy

    def frozen_lm(self, lm: nn.Module) -> nn.Module:
        """What the answers and log P_Q run on: ``lm`` (the policy, adapters off, from
        :func:`frozen_base`) or, under ``cfg.frozen_weights``, a copy of the base with fewer
        bytes per weight, made once (the base is frozen)."""
        kind = resolve_frozen_weights(self.cfg.frozen_weights, self.policy)
        if kind == "shared":
            return lm
        if kind not in self._copies:
            self._copies[kind] = frozen_copy(self.policy, kind)
        return self._copies[kind]

    def _judge(
        self,
        edit_facts: Sequence[str],
        questions: Sequence[str],
        lm: nn.Module,
        subjects: Sequence[str],
    ) -> _Judged:
        """Answers, judge scores and the genuine-form flags of (fact, question) pairs, each
        distinct question answered once and each distinct (fact, text) pair judged once."""
        uniq_q = list(dict.fromkeys(questions))
        ans, ans_ids = self.generate_answers(uniq_q, lm)
        by_q = dict(zip(uniq_q, range(len(uniq_q)), strict=True))
        answers = [ans[by_q[q]] for q in questions]
        device = model_device(lm)
        log_c, question, echo = judge_answers(
            self.nli, edit_facts, questions, answers, self.cfg.judge_question, device
        )
        log_pa = None
        if self.cfg.w_ans != 0.0:
            uniq_pa = self.answer_logprob(uniq_q, ans_ids, lm)
            log_pa = uniq_pa[
                torch.tensor([by_q[q] for q in questions], device=device, dtype=torch.long)
            ]
        gated = torch.ones_like(question)
        if self.cfg.answer_gate == "subject":
            named = [mentions_subject(a, s) for a, s in zip(answers, subjects, strict=True)]
            gated = torch.tensor(named, device=device, dtype=torch.bool)
        return _Judged(answers, log_c, log_pa, question, echo, gated)

    # ------------------------------------------------------------------ rewards
    def _log_r(
        self,
        judged: _Judged,
        log_pq: Tensor,
        n_tok: Tensor,
        log_pa: Tensor | None,
        step: int,
        novelty: Tensor | None = None,
        crowding: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        form_ok = judged.question & ~judged.echo & judged.gated
        return counted_log_r(
            self.cfg, judged.log_c, form_ok, log_pq, n_tok, log_pa, step, novelty, crowding
        )

    def embeddings(self, questions: Sequence[str]) -> Tensor | None:
        """``[N, D]`` sentence embeddings of the questions, computed once for the novelty and
        sharing terms; ``None`` when neither is on."""
        if (self.cfg.w_div == 0.0 and self.cfg.w_share == 0.0) or self.embedder is None:
            return None
        return self.embedder.encode(list(questions))

    def novelty(self, edit_facts: Sequence[str], embeddings: Tensor | None) -> Tensor | None:
        """``FloatTensor[N]`` each question's novelty among the rows of the same edit fact
        (:func:`contraq.lm.embedding.group_novelty`); ``None`` when ``w_div`` is 0."""
        if self.cfg.w_div == 0.0 or embeddings is None:
            return None
        from contraq.lm.embedding import group_novelty

        return group_novelty(embeddings, edit_facts)

    def crowding(
        self, edit_facts: Sequence[str], embeddings: Tensor | None, judged: _Judged
    ) -> Tensor | None:
        """``FloatTensor[N]``: for each counted contradiction, the counted questions of its
        edit fact in its meaning cluster (:func:`contraq.lm.embedding.cluster_crowding`), 1 for
        the others; ``None`` when ``w_share`` is 0."""
        if self.cfg.w_share == 0.0 or embeddings is None:
            return None
        from contraq.lm.embedding import cluster_crowding

        counted = counted_flags(judged.log_c, judged.question, judged.echo) & judged.gated
        if not bool(counted.any()):
            return torch.ones(len(edit_facts), device=judged.log_c.device)
        return cluster_crowding(embeddings, edit_facts, counted.cpu())

    def terminal(
        self, facts: Sequence[EditFact], batch: SampleBatch, step: int = 0
    ) -> RewardOutput:
        """See :class:`Reward`: one batched generation per ``batch_size`` questions, one NLI
        call, one teacher-forced pass."""
        check_rows(facts, batch, type(self).__name__)
        questions = decode_questions(self.tokenizer, batch.actions, batch.lengths)
        with frozen_base(self.policy) as base:
            lm = self.frozen_lm(base)
            dev = model_device(lm)
            actions, lengths = batch.actions.to(dev), batch.lengths.to(dev)
            tok_lp, _ = batch_logprobs(lm, batch, self.term_id, self.cfg.batch_size)
            judged = self._judge(
                [f.edit_fact for f in facts], questions, lm, [f.subject for f in facts]
            )
        log_c, log_pa = judged.log_c, judged.log_pa
        log_pq = tok_lp.sum(1)
        n_tok = question_lengths(actions, lengths, self.term_id)
        edits = [f.edit_fact for f in facts]
        embeddings = self.embeddings(questions)  # shared by the novelty and sharing terms
        novelty = self.novelty(edits, embeddings)
        credit = None
        if novelty is not None:
            novelty = novelty.to(log_pq.device)
            subjects = [f.subject for f in facts]
            credit = novelty_credit(novelty, questions, subjects, self.cfg.div_gate)
        crowding = self.crowding(edits, embeddings, judged)
        log_r, n_nonfinite = self._log_r(judged, log_pq, n_tok, log_pa, step, credit, crowding)
        floor = self.cfg.min_log_r
        log_c = torch.nan_to_num(log_c, nan=floor, posinf=floor, neginf=floor)
        components = {
            "log_c": log_c,
            "log_pq": torch.nan_to_num(log_pq, nan=floor, posinf=floor, neginf=floor),
            "length": n_tok.float(),
            "n_nonfinite": n_nonfinite,
            "is_question": judged.question.float(),
            "is_echo": judged.echo.float(),
            "genuine": counted_flags(log_c, judged.question, judged.echo).float(),
        }
        if self.cfg.answer_gate != "none":
            components["answer_gated"] = judged.gated.float()
        if log_pa is not None:
            components["log_pa"] = torch.nan_to_num(log_pa, nan=floor, posinf=floor, neginf=floor)
        if novelty is not None:
            components["novelty"] = novelty
        if crowding is not None:
            components["crowding"] = crowding.to(log_pq.device)
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
        check_rows(facts, batch, type(self).__name__)
        with frozen_base(self.policy) as base:
            lm = self.frozen_lm(base)
            dev = model_device(lm)
            actions, lengths = batch.actions.to(dev), batch.lengths.to(dev)
            tok_lp, term_lp = batch_logprobs(lm, batch, self.term_id, self.cfg.batch_size)
            defined = prefix_states(lengths, actions.shape[1], min_len)
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
            subjects = [facts[b].subject for b in rows.tolist()]
            judged = self._judge(edit_facts, questions, lm, subjects) if questions else None
        out = torch.zeros(actions.shape, dtype=torch.float32, device=dev)
        if judged is None:
            return out
        log_pq = prefix_log_pq(tok_lp, term_lp)[rows, ts]
        log_r, _ = self._log_r(judged, log_pq, ts, judged.log_pa, step)
        out[rows, ts] = log_r
        return out
