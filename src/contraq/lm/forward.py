"""One forward pass of a Hugging Face causal LM, and each distinct prompt run only once.

A training step asks ``n`` questions of each of a few facts, so its ``B`` rows carry only
``B / n`` distinct prompts, and the prompt (about 65 tokens) is five times longer than a
question. :func:`prefill` runs each distinct prompt once and copies its KV cache to every row
drawn from it; the sampler and the teacher-forced passes (policy and base LM) then feed only
the question tokens. The log-probs are those of the full pass up to float rounding, and the
gradient flows through the copies into the shared prompt pass.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

_FORWARD_KW: dict[type, tuple[str, bool]] = {}
_SHARING = [True]  # switched off only by no_prompt_sharing (the benchmark's baseline)


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or ``model`` itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _forward_kw(model: nn.Module) -> tuple[str, bool]:
    """(name of the KV-cache argument, whether ``logits_to_keep`` is accepted) for this
    transformers version / architecture (5.x renamed ``past_key_values`` to ``cache``)."""
    cls = type(hf_model(model))
    if cls not in _FORWARD_KW:
        params = inspect.signature(cls.forward).parameters
        cache_kw = "cache" if "cache" in params else "past_key_values"
        _FORWARD_KW[cls] = (cache_kw, "logits_to_keep" in params)
    return _FORWARD_KW[cls]


def forward(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor,
    keep: int,
    cache: Any = None,
    use_cache: bool = False,
    output_hidden_states: bool = False,
) -> tuple[Tensor, Any, Any]:
    """One forward pass. Returns (logits of the last ``keep`` positions [B, keep, V], cache,
    hidden states or None)."""
    cache_kw, has_keep = _forward_kw(model)
    kwargs: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "use_cache": use_cache,
    }
    if cache is not None:
        kwargs[cache_kw] = cache
    if has_keep:
        kwargs["logits_to_keep"] = keep
    if output_hidden_states:
        kwargs["output_hidden_states"] = True
    out = model(**kwargs)
    new_cache = getattr(out, cache_kw, None) if use_cache else None
    return out.logits[:, -keep:], new_cache, getattr(out, "hidden_states", None)


def decode_step(
    model: nn.Module, token: Tensor, mask: Tensor, position: Tensor, cache: Any
) -> tuple[Tensor, Any]:
    """One KV-cached decoding step: ``token`` LongTensor[B] fed at ``position`` [B, 1] with the
    attention ``mask`` [B, P + t + 1] so far. Returns (logits [B, 1, V], the grown cache)."""
    logits, cache, _ = forward(
        model,
        token[:, None],
        decode_mask(model, mask),
        position,
        keep=1,
        cache=cache,
        use_cache=True,
    )
    return logits, cache


def decode_mask(model: nn.Module, mask: Tensor) -> Tensor:
    """A decoding step's 2-D ``mask`` [B, K] in transformers' prepared 4-D form [B, 1, 1, K]
    (0 where the key is seen, the dtype's minimum elsewhere), for the sdpa and eager attention.

    transformers takes a 4-D mask as it is; from a 2-D one it builds its own and first asks,
    on the host, whether any row is padded (``_ignore_causal_mask_sdpa``): a host sync per
    token on a GPU. The one query of a step sees itself, so no row is fully masked. Other
    attention implementations (flash) get the 2-D mask."""
    if not takes_4d_mask(model):
        return mask
    return additive_mask(model, mask != 0)[:, None, None, :]


def takes_4d_mask(model: nn.Module) -> bool:
    """Whether transformers hands ``model``'s attention a 4-D mask as it is (sdpa, eager,
    floating-point weights) rather than building its own."""
    hf = hf_model(model)
    if getattr(hf.config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    return hf.get_input_embeddings().weight.dtype.is_floating_point


def additive_mask(model: nn.Module, seen: Tensor) -> Tensor:
    """``seen`` (bool, any shape) as the additive mask transformers' prepared form uses: 0
    where a key is seen, the weights' dtype minimum elsewhere."""
    dtype = hf_model(model).get_input_embeddings().weight.dtype
    zero = torch.zeros(seen.shape, dtype=dtype, device=seen.device)
    return zero.masked_fill(~seen, torch.finfo(dtype).min)


def positions(mask: Tensor) -> Tensor:
    """Position ids ``cumsum(mask) - 1`` (clamped at 0): left padding changes no log-prob."""
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)


def distinct_prompts(prompt_ids: Tensor, prompt_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The distinct rows of a prompt batch.

    Args:
        prompt_ids, prompt_mask: ``[B, P]``.

    Returns:
        ``(ids [U, P], mask [U, P], inverse LongTensor[B])`` with ``ids[inverse] == prompt_ids``.
    """
    width = prompt_ids.shape[1]
    rows = torch.cat([prompt_ids, prompt_mask.to(prompt_ids.dtype)], dim=1)
    uniq, inverse = torch.unique(rows, dim=0, return_inverse=True)
    return uniq[:, :width], uniq[:, width:].to(prompt_mask.dtype), inverse


def cache_usable(model: nn.Module) -> bool:
    """Whether a forward pass of ``model`` now keeps a KV cache: transformers drops it in a
    gradient-checkpointed layer that trains with gradients on."""
    if not (model.training and torch.is_grad_enabled()):
        return True
    return not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def sharing_prompts() -> bool:
    """False inside :func:`no_prompt_sharing`."""
    return _SHARING[0]


@contextlib.contextmanager
def no_prompt_sharing() -> Iterator[None]:
    """Every row runs its own prompt for the duration: the baseline of bench/bench_step.py."""
    _SHARING[0] = False
    try:
        yield
    finally:
        _SHARING[0] = True


def prefill(
    model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, output_hidden_states: bool = False
) -> tuple[Tensor, Any, Tensor | None] | None:
    """Each distinct prompt's forward pass once, its results copied to the rows that share it.

    Args:
        prompt_ids, prompt_mask: ``LongTensor[B, P]``, left-padded.
        output_hidden_states: also return the last layer's hidden states over the prompt.

    Returns:
        ``(logits [B, 1, V] of the last prompt position, KV cache of B rows, hidden [B, P, H]
        or None)``; ``None`` when every row's prompt is distinct or the model would drop the
        cache (then the caller's full pass is as fast).
    """
    if not sharing_prompts():
        return None
    ids, mask, inverse = distinct_prompts(prompt_ids, prompt_mask)
    if ids.shape[0] == prompt_ids.shape[0] or not cache_usable(model):
        return None
    logits, cache, hidden = forward(
        model,
        ids,
        mask,
        positions(mask),
        keep=1,
        use_cache=True,
        output_hidden_states=output_hidden_states,
    )
    if cache is None:
        return None
    cache.reorder_cache(inverse)  # index_select per layer: [U, ...] -> [B, ...], differentiable
    last = hidden[-1].index_select(0, inverse) if output_hidden_states else None
    return logits.index_select(0, inverse), cache, last
