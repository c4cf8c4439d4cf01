"""The generative process: a KV-cached sampler and its teacher-forced re-evaluation.

A state ``s_t`` is prompt + the first ``t`` actions; an action is one token; a question ends
with the termination token. Conventions (see docs/ARCHITECTURE.md):

- ``log_pf[:, t] = log P_F(a_t | s_t)`` and ``log_pterm[:, t] = log P_F(term | s_t)`` of the
  *untempered* policy with the same length masks and banned-token penalty as sampling;
  both 0 after termination, ``log_pterm`` also 0 while termination is masked.
- Length masks at step ``t`` (0-based): termination is masked while ``t < min_len``; at
  ``t == max_len - 1`` only termination is allowed (this wins over ``min_len``), so a
  question has ``min(min_len + 1, max_len) .. max_len`` tokens, termination included.
- Banned tokens get ``ban_penalty`` subtracted from their logit. The default penalty is a
  large finite number (1e4) rather than ``-inf``: their probability underflows to exactly 0
  in float32, yet a replayed sequence that contains one still gets a finite log-prob (about
  -1e4), so losses never see ``inf``/``nan``. ``ban_penalty = inf`` masks them with -inf.
- Sampling uses temperature / top-k / top-p on top of the masked logits, so tempered samples
  are off-policy data for the GFlowNet loss.
- Position ids are ``cumsum(attention_mask) - 1`` in every pass, so left padding never
  changes a log-prob.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from contraq.lm.forward import decode_step, forward, positions, prefill, sharing_prompts
from contraq.lm.packing import packed_logits, packing_usable
from contraq.syncs import check_every


@dataclass(kw_only=True)
class SamplerConfig:
    """How questions are sampled and scored.

    Attributes:
        termination_token_id: the token that ends a question (``lm.models.termination_token_id``).
        pad_token_id: written into ``actions`` after termination.
        min_len: termination is masked at steps ``t < min_len``.
        max_len: at most this many action slots; at ``t == max_len - 1`` only termination.
        temperature: sampling temperature (log-probs are always untempered).
        top_k: keep the k most likely tokens when sampling; ``None``/0 = off.
        top_p: nucleus sampling mass; ``None``/1.0 = off.
        banned_token_ids: tokens penalised by ``ban_penalty`` (newline, eos, specials...).
        ban_penalty: subtracted from banned logits; ``math.inf`` masks them with -inf.
    """

    termination_token_id: int
    pad_token_id: int
    min_len: int = 5
    max_len: int = 24
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    banned_token_ids: list[int] = field(default_factory=list)
    ban_penalty: float = 1e4

    def __post_init__(self) -> None:
        self.banned_token_ids = sorted({int(i) for i in self.banned_token_ids})
        if self.max_len < 1:
            raise ValueError(f"SamplerConfig.max_len={self.max_len}: must be >= 1")
        if not 0 <= self.min_len <= self.max_len:
            raise ValueError(
                f"SamplerConfig.min_len={self.min_len}: must lie in [0, max_len={self.max_len}]"
            )
        if not self.temperature > 0:
            raise ValueError(f"SamplerConfig.temperature={self.temperature}: must be > 0")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"SamplerConfig.top_k={self.top_k}: must be >= 0")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"SamplerConfig.top_p={self.top_p}: must lie in (0, 1]")
        if not self.ban_penalty >= 0:
            raise ValueError(f"SamplerConfig.ban_penalty={self.ban_penalty}: must be >= 0")
        if self.termination_token_id in self.banned_token_ids:
            raise ValueError(
                f"SamplerConfig.banned_token_ids contains the termination token "
                f"{self.termination_token_id}"
            )


def default_banned_token_ids(tokenizer: Any, termination_token_id: int) -> list[int]:
    """Special tokens (eos, chat markers, ...) and every token whose text contains a newline:
    a question is one line and must end with the termination token, not with eos."""
    banned = set(int(i) for i in tokenizer.all_special_ids)
    for token_id in range(len(tokenizer)):
        if "\n" in tokenizer.decode([token_id]):
            banned.add(token_id)
    banned.discard(int(termination_token_id))
    return sorted(banned)


@dataclass
class SampleBatch:
    """B sampled questions (shapes in docs/ARCHITECTURE.md).

    Attributes:
        prompt_ids: LongTensor[B, P], left-padded.
        prompt_mask: LongTensor[B, P], 1 on real prompt tokens.
        actions: LongTensor[B, T], termination included, then ``pad_token_id``.
        lengths: LongTensor[B], number of actions including termination.
        log_pf: FloatTensor[B, T], untempered log P_F(a_t | s_t), 0 after termination.
        log_pterm: FloatTensor[B, T], log P_F(term | s_t), 0 after termination / while masked.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    actions: Tensor
    lengths: Tensor
    log_pf: Tensor
    log_pterm: Tensor

    @property
    def generated_text(self) -> Tensor:
        """LongTensor[B, P + T]: prompt ids followed by the actions (the losses' input)."""
        return torch.cat([self.prompt_ids, self.actions], dim=1)

    @property
    def action_mask(self) -> Tensor:
        """BoolTensor[B, T]: True on actions up to and including termination."""
        steps = torch.arange(self.actions.shape[1], device=self.actions.device)
        return steps[None, :] < self.lengths[:, None]

    def to(self, device: torch.device | str) -> SampleBatch:
        return SampleBatch(
            **{k: getattr(self, k).to(device) for k in self.__dataclass_fields__}  # type: ignore[attr-defined]
        )

    def __len__(self) -> int:
        return int(self.actions.shape[0])


# --------------------------------------------------------------------------- masks


def step_bias(cfg: SamplerConfig, steps: Tensor, vocab_size: int) -> Tensor:
    """Additive logit bias of the length masks and banned-token penalty.

    Args:
        steps: LongTensor[T], the step index t of each row.
        vocab_size: V.

    Returns:
        FloatTensor[T, V] on ``steps.device``: ``-ban_penalty`` on banned tokens, ``-inf`` on
        termination while ``t < min_len``, ``-inf`` on everything but termination at
        ``t >= max_len - 1``.
    """
    term = cfg.termination_token_id
    if not 0 <= term < vocab_size:
        raise ValueError(f"termination_token_id={term} outside the vocabulary (size {vocab_size})")
    bias = torch.zeros(steps.shape[0], vocab_size, device=steps.device)
    if cfg.banned_token_ids:
        banned = torch.tensor(cfg.banned_token_ids, device=steps.device)
        banned = banned[banned < vocab_size]
        bias[:, banned] = -math.inf if math.isinf(cfg.ban_penalty) else -float(cfg.ban_penalty)
    forced = steps >= cfg.max_len - 1
    bias[(steps < cfg.min_len) & ~forced, term] = -math.inf
    bias[forced] = -math.inf
    bias[forced, term] = 0.0
    return bias


def termination_allowed(cfg: SamplerConfig, steps: Tensor) -> Tensor:
    """BoolTensor[T]: whether log_pterm is defined (stored) at each step."""
    return (steps >= cfg.min_len) | (steps >= cfg.max_len - 1)


def action_mask_from_actions(actions: Tensor, termination_token_id: int) -> Tensor:
    """BoolTensor[B, T]: True up to and including the first termination token (all True for a
    row that never terminates)."""
    is_term = (actions == termination_token_id).long()
    return (is_term.cumsum(dim=1) - is_term) == 0


def _filter_top_k_top_p(logits: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    """Set logits outside the top-k / nucleus to -inf. logits: FloatTensor[B, V]."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    return logits


def _check_prompt(prompt_ids: Tensor, prompt_mask: Tensor) -> None:
    if prompt_ids.ndim != 2 or prompt_ids.shape != prompt_mask.shape:
        raise ValueError(
            f"prompt_ids {tuple(prompt_ids.shape)} and prompt_mask {tuple(prompt_mask.shape)} "
            "must both be [B, P]"
        )
    if prompt_ids.shape[1] == 0 or not bool(prompt_mask[:, -1].all()):
        raise ValueError("prompts must be non-empty and LEFT-padded (prompt_mask[:, -1] all 1)")


@contextlib.contextmanager
def sampling_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the duration, each submodule's ``training`` flag restored on exit.

    Why: in train mode transformers turns the KV cache off when gradient checkpointing is
    enabled (silently, or with a one-time warning), which would make the sampler quadratic.
    Dropout is 0 in the policy, so eval and train mode compute the same log-probs.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, was_training in flags:
            m.training = was_training


# --------------------------------------------------------------------------- sampling


def _draw(
    masked: Tensor, logp: Tensor, cfg: SamplerConfig, generator: torch.Generator | None
) -> Tensor:
    """One token per row, LongTensor[B]: from the tempered / top-k / top-p distribution of the
    masked logits ``[B, V]`` when ``cfg`` asks for one, else from the policy's ``logp``."""
    if cfg.temperature != 1.0 or bool(cfg.top_k) or (cfg.top_p or 1.0) < 1.0:
        scaled = _filter_top_k_top_p(masked / cfg.temperature, cfg.top_k, cfg.top_p)
        probs = torch.softmax(scaled, dim=-1)
    else:
        probs = logp.exp()
    return draw_tokens(probs, generator)


def device_generator(
    generator: torch.Generator | None, device: torch.device | str
) -> torch.Generator | None:
    """The generator one sampling call draws from on ``device``: ``generator`` itself when it
    lives there (or is None), else a new one on ``device`` seeded by one draw of ``generator``.

    The training step's generators live on the CPU (``contraq.training.step.step_generator``:
    one resumable stream whatever the device). Drawing each token from that CPU stream would
    copy every step's probabilities to the host, a host sync per token on a GPU; one draw per
    call keeps the caller's stream resumable and the loop on the device. On a GPU the draws
    are then not the CPU's for the same probabilities.
    """
    device = torch.device(device)
    if generator is None or generator.device.type == device.type:
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def draw_tokens(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One index per row of ``probs`` ``[B, V]`` (LongTensor[B], on ``probs``' device).

    ``torch.multinomial`` refuses a generator on another device than its input: then the draw
    is made on the generator's device (a copy of ``probs`` each call; the sampler avoids it
    with :func:`device_generator`).
    """
    if generator is not None and generator.device.type != probs.device.type:
        on_gen = probs.float().to(generator.device)
        return torch.multinomial(on_gen, 1, generator=generator).squeeze(1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def sample(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    cfg: SamplerConfig,
    generator: torch.Generator | None = None,
) -> SampleBatch:
    """Sample one question per prompt with a KV-cached loop.

    Args:
        model: causal LM (a PeftModel policy or a plain HF model); tensors follow its device.
        prompt_ids: LongTensor[B, P], left-padded.
        prompt_mask: LongTensor[B, P].
        cfg: lengths, termination, sampling temperature/top-k/top-p, banned tokens.
        generator: the trainer's RNG, on the model's device (``None`` = torch's default RNG).

    Returns:
        SampleBatch with T = the longest question (<= max_len); tensors detached.
    """
    _check_prompt(prompt_ids, prompt_mask)
    device = prompt_ids.device
    batch, width = prompt_ids.shape
    term, max_len = cfg.termination_token_id, cfg.max_len

    actions = torch.full((batch, max_len), cfg.pad_token_id, dtype=torch.long, device=device)
    log_pf = torch.zeros(batch, max_len, device=device)
    log_pterm = torch.zeros(batch, max_len, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.full((batch,), max_len, dtype=torch.long, device=device)
    # The attention mask grows by one column per step; preallocated and sliced.
    mask = torch.cat([prompt_mask.long(), prompt_mask.new_ones(batch, max_len).long()], dim=1)
    next_pos = prompt_mask.long().sum(dim=1, keepdim=True)  # [B, 1]
    steps = torch.arange(max_len, device=device)
    allowed = termination_allowed(cfg, steps).tolist()
    bias: Tensor | None = None
    every = check_every(device)
    generator = device_generator(generator, device)

    with sampling_mode(model):
        shared = prefill(model, prompt_ids, prompt_mask)  # each distinct prompt once
        if shared is not None:
            logits, cache, _ = shared
        else:
            logits, cache, _ = forward(
                model, prompt_ids, mask[:, :width], positions(prompt_mask), keep=1, use_cache=True
            )
        n_steps = max_len
        for t in range(max_len):
            if cache is None:
                raise RuntimeError("the model returned no KV cache (use_cache ignored)")
            step_logits = logits[:, -1].float()  # [B, V]
            if bias is None:
                bias = step_bias(cfg, steps, step_logits.shape[-1])
            masked = step_logits + bias[t]
            logp = torch.log_softmax(masked, dim=-1)  # untempered policy
            token = _draw(masked, logp, cfg, generator).masked_fill(done, cfg.pad_token_id)
            actions[:, t] = token
            log_pf[:, t] = logp.gather(1, token[:, None]).squeeze(1).masked_fill(done, 0.0)
            if allowed[t]:
                log_pterm[:, t] = logp[:, term].masked_fill(done, 0.0)
            finished = (token == term) & ~done
            lengths = torch.where(finished, t + 1, lengths)
            done = done | finished
            # The host looks once per `every` steps (1 on the CPU): the stopping check.
            if t == max_len - 1 or ((t + 1) % every == 0 and bool(done.all())):
                n_steps = t + 1
                break
            logits, cache = decode_step(model, token, mask[:, : width + t + 1], next_pos + t, cache)
    if every > 1:
        n_steps = int(lengths.max())  # the steps past every row's end hold only padding
    return SampleBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        actions=actions[:, :n_steps].contiguous(),
        lengths=lengths,
        log_pf=log_pf[:, :n_steps].contiguous(),
        log_pterm=log_pterm[:, :n_steps].contiguous(),
    )


# --------------------------------------------------------------------------- teacher forcing


def teacher_forced_logits(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    actions: Tensor,
    active: Tensor,
    output_hidden_states: bool = False,
) -> tuple[Tensor, Any]:
    """Logits FloatTensor[B, T, V] predicting each action (float32), and hidden states (with
    ``output_hidden_states``: a sequence whose last item covers at least the prompt, [B, >=P, H]).

    The last action is never fed (nothing is predicted from it): input = prompt + a_0..a_{T-2}.
    With sdpa or eager attention each distinct prompt and its questions are packed into one row
    with no padding between questions (:func:`contraq.lm.packing.packed_logits`; inactive slots
    then hold 0); otherwise rows that share a prompt share its forward pass
    (:func:`contraq.lm.forward.prefill`).
    """
    _check_prompt(prompt_ids, prompt_mask)
    if actions.ndim != 2 or actions.shape[0] != prompt_ids.shape[0] or actions.shape[1] == 0:
        raise ValueError(f"actions {tuple(actions.shape)} must be [B, T>0] with B = prompts' B")
    if sharing_prompts() and packing_usable(model):  # one packed row per distinct prompt
        return packed_logits(model, prompt_ids, prompt_mask, actions, active, output_hidden_states)
    n_actions, width = actions.shape[1], prompt_ids.shape[1]
    mask = torch.cat([prompt_mask.long(), active[:, :-1].long()], dim=1)
    shared = prefill(model, prompt_ids, prompt_mask, output_hidden_states)
    if shared is None:
        input_ids = torch.cat([prompt_ids, actions[:, :-1]], dim=1)
        logits, _, hidden = forward(
            model,
            input_ids,
            mask,
            positions(mask),
            keep=n_actions,
            use_cache=False,
            output_hidden_states=output_hidden_states,
        )
        return logits.float(), hidden
    logits, cache, prompt_hidden = shared
    if n_actions > 1:
        rest, _, _ = forward(
            model,
            actions[:, :-1],
            mask,
            positions(mask)[:, width:],
            keep=n_actions - 1,
            cache=cache,
            use_cache=True,
        )
        logits = torch.cat([logits, rest], dim=1)
    return logits.float(), ((prompt_hidden,) if output_hidden_states else None)


def score_actions(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    actions: Tensor,
    cfg: SamplerConfig,
    return_prompt_hidden: bool = False,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Re-evaluate sampled actions in ONE teacher-forced pass (differentiable).

    Args:
        prompt_ids, prompt_mask: LongTensor[B, P], left-padded.
        actions: LongTensor[B, T] (T <= max_len); the first termination token ends a row.
        cfg: the SamplerConfig used for sampling (masks and penalty; temperature ignored).
        return_prompt_hidden: also return the last layer's hidden states over the prompt.

    Returns:
        (log_pf, log_pterm), FloatTensor[B, T] each, equal to ``sample``'s values; with
        ``return_prompt_hidden`` also FloatTensor[B, P, H] (pool with ``prompt_mask``).
    """
    n_actions = actions.shape[1]
    if n_actions > cfg.max_len:
        raise ValueError(f"actions have {n_actions} steps > SamplerConfig.max_len={cfg.max_len}")
    active = action_mask_from_actions(actions, cfg.termination_token_id)
    logits, hidden = teacher_forced_logits(
        model, prompt_ids, prompt_mask, actions, active, output_hidden_states=return_prompt_hidden
    )
    steps = torch.arange(n_actions, device=actions.device)
    logp = torch.log_softmax(logits + step_bias(cfg, steps, logits.shape[-1]), dim=-1)
    # torch.where, not a product: a masked -inf must give 0, not nan.
    lp_action = logp.gather(-1, actions[..., None]).squeeze(-1)
    log_pf = torch.where(active, lp_action, torch.zeros_like(lp_action))
    term_ok = active & termination_allowed(cfg, steps)[None, :]
    lp_term = logp[..., cfg.termination_token_id]
    log_pterm = torch.where(term_ok, lp_term, torch.zeros_like(lp_term))
    if return_prompt_hidden:
        if hidden is None:
            raise RuntimeError("the model returned no hidden states")
        return log_pf, log_pterm, hidden[-1][:, : prompt_ids.shape[1]]
    return log_pf, log_pterm


def token_logprobs(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    actions: Tensor,
    lengths: Tensor | None = None,
    termination_token_id: int | None = None,
) -> Tensor:
    """Raw log P(a_t | s_t) of each action: no length masks, no penalty, no temperature.

    Used with the base model (``lm.models.base_model``) for log P_Q of a question.

    Args:
        prompt_ids, prompt_mask: LongTensor[B, P], left-padded.
        actions: LongTensor[B, T].
        lengths: LongTensor[B], actions per row including termination; or
        termination_token_id: the end of each row is its first termination token.

    Returns:
        FloatTensor[B, T], 0 after the end of each row.
    """
    steps = torch.arange(actions.shape[1], device=actions.device)
    if lengths is not None:
        active = steps[None, :] < lengths.to(actions.device)[:, None]
    elif termination_token_id is not None:
        active = action_mask_from_actions(actions, termination_token_id)
    else:
        raise ValueError("token_logprobs needs lengths or termination_token_id to find row ends")
    logits, _ = teacher_forced_logits(model, prompt_ids, prompt_mask, actions, active)
    lp = torch.log_softmax(logits, dim=-1).gather(-1, actions[..., None]).squeeze(-1)
    return torch.where(active, lp, torch.zeros_like(lp))
