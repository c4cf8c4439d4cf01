"""Answering a question with the frozen base LM: the answer prompt, batched greedy generation
(the batch's common prompt prefix run once, LEFT padding after it, cut at the first newline)
and the answer's log-likelihood."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from contraq.lm.forward import decode_step, forward, positions, sharing_prompts
from contraq.lm.tokens import left_pad, right_pad
from contraq.reward.base import base_logprobs, model_device
from contraq.syncs import check_every

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


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Tokens that every row starts with, leaving each row at least one token of its own (its
    first answer token is predicted from its own last prompt token)."""
    if not rows:
        return 0
    limit = min(len(r) for r in rows) - 1
    first = rows[0]
    k = 0
    while k < limit and all(r[k] == first[k] for r in rows):
        k += 1
    return k


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

    def _prompt_rows(self, questions: Sequence[str]) -> list[list[int]]:
        """Unpadded answer-prompt token ids (the chat template already holds its specials)."""
        enc = self.tokenizer(
            [self.answer_prompt(q) for q in questions],
            add_special_tokens=self.answer_style == "fewshot",
        )
        return [list(r) for r in enc["input_ids"]]

    def _stops(self, lm: nn.Module) -> set[int]:
        eos = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return set(eos if isinstance(eos, list) else [eos]) - {None}

    @torch.no_grad()
    def greedy_continuations(self, rows: Sequence[list[int]], lm: nn.Module) -> list[list[int]]:
        """Greedy continuations of prompt token rows, up to ``answer_max_new_tokens`` each.

        The rows' common prefix (the instruction of the answer prompt) runs once and its KV
        cache is copied to every row; the rest of each row is padded on ``self.padding_side``
        (left: each row's last token predicts its first answer token). A row stops at an end
        token or once its text (leading whitespace dropped) holds a newline; its later slots
        are ``pad_id``, as in ``generate``, and finished rows leave the batch.
        """
        device = model_device(lm)
        n_rows = len(rows)
        k = common_prefix_length(rows) if sharing_prompts() else 0
        cache = None
        if k > 0:
            prefix = torch.tensor([rows[0][:k]], device=device)
            ones = torch.ones_like(prefix)
            _, cache, _ = forward(lm, prefix, ones, positions(ones), keep=1, use_cache=True)
            cache.reorder_cache(torch.zeros(n_rows, dtype=torch.long, device=device))
        tails = [r[k:] for r in rows]
        if self.padding_side == "left":
            tail_ids, tail_mask = left_pad(tails, self.pad_id, device)
        else:  # right padding: only for the test that shows it breaks batched answers
            tail_ids = right_pad(tails, self.pad_id, device)
            lengths = torch.tensor([len(t) for t in tails], device=device)
            tail_mask = (
                torch.arange(tail_ids.shape[1], device=device)[None] < lengths[:, None]
            ).long()
        mask = torch.cat([tail_mask.new_ones(n_rows, k), tail_mask.long()], dim=1)
        logits, cache, _ = forward(
            lm, tail_ids, mask, positions(mask)[:, k:], keep=1, cache=cache, use_cache=True
        )
        next_pos = mask.sum(dim=1, keepdim=True)
        width = self.cfg.answer_max_new_tokens
        out = torch.full((n_rows, width), self.pad_id, dtype=torch.long, device=device)
        stop, newline, late_newline, content = self._token_tables(lm, logits.shape[-1], device)
        done = torch.zeros(n_rows, dtype=torch.bool, device=device)
        started = torch.zeros(n_rows, dtype=torch.bool, device=device)  # non-space text yet
        end_at = torch.full((n_rows,), width, dtype=torch.long, device=device)  # tokens kept
        live = torch.arange(n_rows, device=device)  # the rows in the cache
        every, n_new = check_every(device), 0
        for t in range(width):
            token = logits[:, -1].argmax(dim=-1)
            was_done = done[live]
            token = token.masked_fill(was_done, self.pad_id)
            out[live, t] = token
            # A row ends with an end token, or with a newline once its text (leading
            # whitespace dropped) is under way or the newline follows text in the token.
            ends = stop[token] | (newline[token] & (started[live] | late_newline[token]))
            done[live] = was_done | ends
            end_at[live] = torch.where(ends & ~was_done, t + 1, end_at[live])
            started[live] = started[live] | content[token]
            n_new = t + 1
            if t == width - 1:
                break
            if (t + 1) % every == 0:  # the host looks: one sync per `every` steps
                left = (~done[live]).nonzero().flatten()
                if left.numel() == 0:
                    break
                if 4 * left.numel() <= 3 * live.numel():
                    # Finished rows (a quarter or more) leave the batch: a rambling answer runs
                    # to the cap while most rows stopped long before.
                    cache.reorder_cache(left)
                    live, token = live[left], token[left]
                    mask, next_pos = mask[left], next_pos[left]
            mask = torch.cat([mask, mask.new_ones(live.numel(), 1)], dim=1)
            logits, cache = decode_step(lm, token, mask, next_pos + t, cache)
        if every > 1:  # the steps after every row had ended hold padding only
            n_new = int(end_at.max())
        return out[:, :n_new].tolist()

    def _token_tables(
        self, lm: nn.Module, vocab: int, device: torch.device
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """BoolTensor[V] each, from every token's own text (made once per device): an end
        token; its text holds a newline; it holds a newline after a non-space character; it
        holds a non-space character. A newline byte is always a token's own (byte-level BPE),
        so these decide what decoding the whole row would (``first_line``)."""
        key = (str(device), vocab, tuple(sorted(self._stops(lm))))
        cached = getattr(self, "_tables", None)
        if cached is None or cached[0] != key:
            texts = self.tokenizer.batch_decode(
                [[i] for i in range(len(self.tokenizer))], skip_special_tokens=True
            )
            texts = (texts + [""] * vocab)[:vocab]  # ids past the tokenizer's: no text
            stop = torch.zeros(vocab, dtype=torch.bool)
            stop[[i for i in self._stops(lm) if i < vocab]] = True
            tables = (
                stop,
                torch.tensor(["\n" in x for x in texts]),
                torch.tensor(["\n" in x.lstrip() for x in texts]),
                torch.tensor([x.strip() != "" for x in texts]),
            )
            self._tables = (key, tuple(t.to(device) for t in tables))
        return self._tables[1]

    def generate_answers(
        self, questions: Sequence[str], lm: nn.Module
    ) -> tuple[list[str], list[list[int]]]:
        """Greedy answers of ``lm`` (call with the base LM), ``batch_size`` questions at a time
        (:meth:`greedy_continuations`).

        Returns:
            ``(answers, answer_token_ids)``: the kept answer text per question and the
            generated token ids it came from (for ``log P_A``).
        """
        answers: list[str] = []
        answer_ids: list[list[int]] = []
        rows = self._prompt_rows(questions)
        for lo in range(0, len(rows), self.cfg.batch_size):
            new = self.greedy_continuations(rows[lo : lo + self.cfg.batch_size], lm)
            texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
            answers += [first_line(t) for t in texts]
            if self.cfg.w_ans != 0.0:
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
