"""Draw k *distinct* questions per prompt, exactly as sampling without replacement from the
policy would: stochastic beam search (Gumbel-top-k over sequences; Kool, van Hoof and Welling
2019; docs/DESIGN.md, "The set").

Why: a trained policy repeats its best questions, and each repeat costs an answer and a judge
call while adding nothing to the set a user takes away. Drawing ``k`` without replacement gives
``k`` distinct questions for the cost of about ``k`` independent draws (one KV-cached decode
loop over ``k`` beams per prompt), where drawing until distinct took up to ten rounds.

How: every prefix ``s`` carries ``phi(s)``, its log-probability under the sampling distribution,
and a perturbed value ``G(s)``: the largest Gumbel-perturbed log-probability among the complete
questions that extend it. The root has ``G = 0``. A child ``s + a`` draws
``G~ = phi(s + a) + Gumbel`` and is then shifted so that the largest child equals ``G(s)``
(sampling the children's Gumbels conditioned on their maximum). Each step keeps the ``k``
prefixes with the largest ``G``; a finished question competes with its own ``G``. The ``k``
complete questions left are the top-k of independent Gumbel-perturbed log-probabilities of all
questions, i.e. a sample without replacement, in the order it would have been drawn; so the
first ``m`` of them are a sample of size ``m``.

The sampling distribution is the sampler's: length masks, banned tokens, temperature, top-k and
top-p (:mod:`contraq.lm.sampling`); ``log_pf``/``log_pterm`` in the batch are, as there, the
untempered policy's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from contraq.lm.forward import decode_step, forward, positions, prefill
from contraq.lm.sampling import (
    SampleBatch,
    SamplerConfig,
    _check_prompt,
    _filter_top_k_top_p,
    device_generator,
    sampling_mode,
    step_bias,
    termination_allowed,
)
from contraq.syncs import check_every


def gumbel_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard Gumbel noise of ``x``'s shape and device (``x``'s dtype), drawn in float32 from
    ``generator`` (on the generator's device, like :func:`contraq.lm.sampling.draw_tokens`)."""
    dev = generator.device if generator is not None else x.device
    u = torch.rand(x.shape, generator=generator, device=dev)
    u = u.clamp(min=torch.finfo(torch.float32).tiny)
    return (-torch.log(-torch.log(u))).to(device=x.device, dtype=x.dtype)


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate near 0 and for very negative ``x``."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def truncated_gumbel(parent: Tensor, perturbed: Tensor) -> Tensor:
    """Children's values conditioned on their maximum being the parent's.

    Args:
        parent: ``[..., 1]`` the parent's ``G`` (finite).
        perturbed: ``[..., V]`` the children's ``phi + Gumbel`` (``-inf`` for children that
            cannot occur); at least one finite per row.

    Returns:
        ``[..., V]``: ``-log(exp(-G) - exp(-Z) + exp(-G~))`` with ``Z`` the row's maximum of
        ``G~``, computed as ``G - softplus(G - G~ + log(1 - exp(G~ - Z)))``: the maximum child
        gets exactly ``G``, the others less, ``-inf`` stays ``-inf``.
    """
    top = perturbed.max(dim=-1, keepdim=True).values
    gap = (perturbed - top).clamp(max=0.0)
    v = parent - perturbed + log1mexp(gap)
    out = parent - torch.nn.functional.softplus(v)
    return torch.where(torch.isneginf(perturbed), perturbed, out)


@dataclass
class DistinctBatch:
    """``k`` distinct questions per prompt from :func:`sample_distinct`.

    Attributes:
        batch: the questions as a :class:`SampleBatch` of ``B * k`` rows, prompt-major; within
            a prompt in drawing order (largest perturbed value first).
        keys: FloatTensor[B * k], each question's perturbed value ``G``.
        valid: BoolTensor[B * k]; False only where a prompt has fewer than ``k`` possible
            questions (then that row repeats nothing and must be dropped).
    """

    batch: SampleBatch
    keys: Tensor
    valid: Tensor


def _sampling_logp(masked: Tensor, cfg: SamplerConfig) -> Tensor:
    """``[N, V]`` log-probabilities of the sampling distribution (temperature, top-k, top-p on
    the masked logits)."""
    if cfg.temperature == 1.0 and not cfg.top_k and (cfg.top_p or 1.0) >= 1.0:
        return torch.log_softmax(masked, dim=-1)
    scaled = _filter_top_k_top_p(masked / cfg.temperature, cfg.top_k, cfg.top_p)
    return torch.log_softmax(scaled, dim=-1)


def _candidates(
    keys: Tensor, phi: Tensor, logp_s: Tensor, done: Tensor, generator: torch.Generator | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Each beam's ``k`` best children as ``(G [B, k, k], phi [B, k, k], token [B, k, k])``.

    Only a beam's ``k`` largest perturbed children can enter the top-k, and the shift of
    :func:`truncated_gumbel` keeps their order, so it is applied to those alone. A finished
    beam stays itself (its ``G`` in slot 0, the other slots ``-inf``); a dead beam
    (``G = -inf``) has no child.
    """
    k = keys.shape[1]
    child_phi = phi[..., None] + logp_s  # [B, k, V]
    perturbed = child_phi + gumbel_like(child_phi, generator)
    top, token = perturbed.topk(k, dim=-1)  # [B, k, k]; top[..., 0] is the children's max
    alive = ~torch.isneginf(keys)
    parent = torch.where(alive, keys, torch.zeros_like(keys))[..., None]
    cand = truncated_gumbel(parent, top)
    cand_phi = child_phi.gather(-1, token)
    stay = torch.full_like(cand, -math.inf)
    stay[..., 0] = keys
    cand = torch.where(done[..., None], stay, cand)
    cand = torch.where(alive[..., None], cand, torch.full_like(cand, -math.inf))
    cand_phi = torch.where(done[..., None], phi[..., None].expand_as(cand_phi), cand_phi)
    return cand, cand_phi, token


@dataclass
class _Beams:
    """The questions of the live beams, one row each (``[rows, max_len]``, ``lengths [rows]``)."""

    actions: Tensor
    log_pf: Tensor
    log_pterm: Tensor
    lengths: Tensor

    @classmethod
    def empty(cls, rows: int, max_len: int, pad: int, device: torch.device) -> _Beams:
        return cls(
            torch.full((rows, max_len), pad, dtype=torch.long, device=device),
            torch.zeros(rows, max_len, device=device),
            torch.zeros(rows, max_len, device=device),
            torch.full((rows,), max_len, dtype=torch.long, device=device),
        )

    def take(self, src: Tensor) -> _Beams:
        """Each new beam's copy of its parent's row (``src [rows]``: the parents' rows)."""
        return _Beams(*(x.index_select(0, src) for x in vars(self).values()))

    def extend(
        self, t: int, token: Tensor, logp: Tensor, fresh: Tensor, term: int, can_stop: bool
    ) -> Tensor:
        """Write step ``t``'s ``token [rows]`` with its ``logp [rows, V]`` on the ``fresh``
        (unfinished) rows; returns ``BoolTensor[rows]``: the rows that terminated now."""
        self.actions[:, t] = token
        self.log_pf[:, t] = torch.where(fresh, logp.gather(1, token[:, None]).squeeze(1), 0.0)
        if can_stop:
            self.log_pterm[:, t] = torch.where(fresh, logp[:, term], 0.0)
        finished = fresh & (token == term)
        self.lengths = torch.where(finished, t + 1, self.lengths)
        return finished

    def batch(self, prompt_ids: Tensor, prompt_mask: Tensor, n_steps: int) -> SampleBatch:
        return SampleBatch(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            actions=self.actions[:, :n_steps].contiguous(),
            lengths=self.lengths,
            log_pf=self.log_pf[:, :n_steps].contiguous(),
            log_pterm=self.log_pterm[:, :n_steps].contiguous(),
        )


def _first_logits(model: nn.Module, ids: Tensor, pmask: Tensor) -> tuple[Tensor, Any]:
    """The prompts' last logits and their KV cache (distinct prompts prefilled once)."""
    shared = prefill(model, ids, pmask)
    if shared is not None:
        logits, cache, _ = shared
    else:
        logits, cache, _ = forward(model, ids, pmask, positions(pmask), keep=1, use_cache=True)
    return logits, cache


@torch.no_grad()
def sample_distinct(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    cfg: SamplerConfig,
    k: int,
    generator: torch.Generator | None = None,
) -> DistinctBatch:
    """``k`` distinct questions per prompt, a sample without replacement from the sampling
    distribution of ``cfg`` (stochastic beam search; see the module docstring).

    Args:
        model: causal LM (a PeftModel policy or a plain HF model).
        prompt_ids: LongTensor[B, P], left-padded; each row is one prompt (not repeated).
        prompt_mask: LongTensor[B, P].
        cfg: as for :func:`contraq.lm.sampling.sample`.
        k: questions per prompt (beams).
        generator: the Gumbel noise's RNG.

    Returns:
        :class:`DistinctBatch` of ``B * k`` rows.
    """
    _check_prompt(prompt_ids, prompt_mask)
    if k < 1:
        raise ValueError(f"sample_distinct: k must be >= 1, got {k}")
    device = prompt_ids.device
    n_prompts, width = prompt_ids.shape
    rows = n_prompts * k
    term, max_len = cfg.termination_token_id, cfg.max_len
    ids = prompt_ids.repeat_interleave(k, 0)
    pmask = prompt_mask.repeat_interleave(k, 0)

    beams = _Beams.empty(rows, max_len, cfg.pad_token_id, device)
    done = torch.zeros(n_prompts, k, dtype=torch.bool, device=device)
    phi = torch.zeros(n_prompts, k, dtype=torch.float64, device=device)
    # Only the first beam of a prompt is alive at the root: the others would repeat it.
    keys = torch.full((n_prompts, k), -math.inf, dtype=torch.float64, device=device)
    keys[:, 0] = 0.0
    mask = torch.cat([pmask.long(), pmask.new_ones(rows, max_len).long()], dim=1)
    next_pos = pmask.long().sum(dim=1, keepdim=True)
    steps = torch.arange(max_len, device=device)
    allowed = termination_allowed(cfg, steps).tolist()
    offsets = (torch.arange(n_prompts, device=device) * k)[:, None]  # [B, 1]
    every = check_every(device)
    generator = device_generator(generator, device)
    # Steps taken before every beam had ended, counted on the device (the host looks only
    # once per `every` steps, and steps past the end hold padding only).
    live_steps = torch.zeros((), dtype=torch.long, device=device)
    ended = torch.zeros((), dtype=torch.bool, device=device)

    with sampling_mode(model):
        logits, cache = _first_logits(model, ids, pmask)
        bias = step_bias(cfg, steps, logits.shape[-1])
        for t in range(max_len):
            masked = logits[:, -1].float() + bias[t]  # [rows, V]
            logp = torch.log_softmax(masked, dim=-1)
            logp_s = _sampling_logp(masked, cfg).double().view(n_prompts, k, -1)
            cand, cand_phi, cand_token = _candidates(keys, phi, logp_s, done, generator)
            top, flat = cand.view(n_prompts, -1).topk(k, dim=-1)  # [B, k]
            parent = flat // k  # beam within the prompt
            token = cand_token.view(n_prompts, -1).gather(1, flat)
            src = (offsets + parent).view(-1)  # global row of each new beam's parent
            was_done = done.gather(1, parent)
            phi = cand_phi.view(n_prompts, -1).gather(1, flat)
            keys = top
            token = torch.where(was_done, cfg.pad_token_id, token).view(-1)
            beams = beams.take(src)
            fresh = ~was_done.view(-1)
            finished = beams.extend(t, token, logp.index_select(0, src), fresh, term, allowed[t])
            done = was_done | finished.view(n_prompts, k)
            live_steps += (~ended).long()
            ended = (done | torch.isneginf(keys)).all()
            if t == max_len - 1 or ((t + 1) % every == 0 and bool(ended)):
                break
            cache.reorder_cache(src)
            logits, cache = decode_step(model, token, mask[:, : width + t + 1], next_pos + t, cache)
    n_steps = int(live_steps)
    valid = ~torch.isneginf(keys).view(-1)
    return DistinctBatch(
        batch=beams.batch(ids, pmask, n_steps), keys=keys.view(-1).float(), valid=valid
    )
