"""Answering a question with the frozen base LM: the answer prompt, batched greedy generation
(LEFT padding, cut at the first newline) and the answer's log-likelihood."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from contraq.reward.base import base_logprobs, model_device
from contraq.tokens import right_pad

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


def first_line(text: str) -> str:
    """An answer as kept: leading whitespace dropped, cut at the first newline, stripped."""
    return text.lstrip().split("\n", 1)[0].strip()


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


class BaseLMAnswers:
    """The answering half of :class:`contraq.reward.contradiction.ContradictionReward`.

    Reads from its subclass: ``self.tokenizer``, ``self.term_id`` and ``self.cfg`` (fields
    ``answer_prompt``, ``answer_max_new_tokens``, ``batch_size``, ``w_ans``), so a changed
    config field takes effect at the next call.
    """

    tokenizer: Any
    term_id: int
    cfg: Any

    def _setup_answers(self, tokenizer: Any) -> None:
        """Pick the answer prompt style and the pad token (errors name the config field)."""
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
        device = model_device(lm)
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

    def answer_logprob(
        self, questions: Sequence[str], answer_ids: Sequence[list[int]], lm: nn.Module
    ) -> Tensor:
        """``FloatTensor[N]``: ``log P_base(answer tokens | answer prompt)``."""
        device = model_device(lm)
        ids, mask = self._encode([self.answer_prompt(q) for q in questions], device)
        width = max((len(a) for a in answer_ids), default=0)
        if width == 0:
            return torch.zeros(len(questions), device=device)
        acts = right_pad(answer_ids, self.pad_id, device)
        lengths = torch.tensor([len(a) for a in answer_ids], device=device)
        tok_lp, _ = base_logprobs(lm, ids, mask, acts, lengths, self.term_id, self.cfg.batch_size)
        return tok_lp.sum(1)
