"""A copy of the frozen base LM with fewer bytes per weight, for the reward's passes on a CPU
(``reward.frozen_weights``).

A KV-cached decode step of a small LM on a CPU is bound by reading every weight once per token,
so the answers (and log P_Q) run faster on a copy of the base whose ``nn.Linear`` weights are
stored in fewer bytes, through PyTorch's dynamic quantisation (fbgemm kernels, CPU only):

- ``float16``: every ``nn.Linear`` (the LM head included) holds float16 weights, unpacked to
  float32 inside the matrix product; activations stay float32. Greedy answers barely change.
- ``int8``: the decoder layers' ``nn.Linear`` hold int8 weights (one scale per output channel)
  and quantise their *inputs* to int8 per call; the LM head and the last
  :data:`INT8_FLOAT_LAST_LAYERS` layers stay float. Faster, but the activations' outliers make
  most greedy answers change (measured in the README), so it is no default.

The copy is float32 outside the quantised layers; the input embeddings are shared with the
policy when its weights are float32. GPT-2's ``Conv1D`` layers are no ``nn.Linear`` and stay
float.
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from contraq.lm.float16_copy import cpu_float32, float16_linears
from contraq.lm.forward import hf_model
from contraq.lm.models import contiguous_head_input

FROZEN_WEIGHTS = ("auto", "shared", "float16", "int8")
INT8_FLOAT_LAST_LAYERS = 2
_LAYER = re.compile(r"\.(\d+)\.")


def resolve_frozen_weights(choice: str, policy: nn.Module) -> str:
    """``shared`` (the policy's own weights, adapters off), ``float16`` or ``int8``: ``auto``
    is ``float16`` for a float32 model on the CPU and ``shared`` elsewhere (on a GPU, or with
    weights already in 2 bytes)."""
    if choice not in FROZEN_WEIGHTS:
        raise ValueError(f"reward.frozen_weights={choice!r}: expected one of {FROZEN_WEIGHTS}")
    if choice != "auto":
        return choice
    return "float16" if cpu_float32(policy) else "shared"


def int8_linear_names(model: nn.Module, float_last_layers: int) -> set[str]:
    """Names of the ``nn.Linear`` modules inside a numbered decoder layer below the last
    ``float_last_layers`` (the LM head and anything outside the numbered layers excluded)."""
    top = int(model.config.num_hidden_layers) - float_last_layers
    names = set()
    for name, module in model.named_modules():
        found = _LAYER.search(f".{name}.")
        if isinstance(module, nn.Linear) and found and int(found.group(1)) < top:
            names.add(name)
    return names


def _base_copy(policy: nn.Module) -> nn.Module:
    """A float32 copy of the policy's transformers model without its LoRA layers, in eval
    mode and without gradients."""
    lora = getattr(policy, "base_model", None)
    if lora is not None and hasattr(lora, "unload"):
        base = copy.deepcopy(lora).unload()  # peft's LoRA wrappers dropped from the copy
    else:
        base = copy.deepcopy(hf_model(policy))
    return base.float().eval().requires_grad_(False)


def frozen_copy(policy: nn.Module, kind: str) -> nn.Module:
    """The base LM of ``policy`` with ``float16`` or ``int8`` ``nn.Linear`` weights (see the
    module docstring). Raises ValueError naming ``reward.frozen_weights`` off the CPU."""
    device = next(policy.parameters()).device
    if device.type != "cpu":
        raise ValueError(
            f"reward.frozen_weights={kind}: the quantised copy runs on the CPU only and the "
            f"model is on {device} (use auto or shared)"
        )
    base = _base_copy(policy)
    if kind == "float16":
        float16_linears(base, {n for n, m in base.named_modules() if isinstance(m, nn.Linear)})
    elif kind == "int8":
        # One scale per output channel: one per tensor changed nearly every answer.
        qz = torch.ao.quantization
        spec = dict.fromkeys(
            int8_linear_names(base, INT8_FLOAT_LAST_LAYERS), qz.per_channel_dynamic_qconfig
        )
        qz.quantize_dynamic(base, spec, dtype=torch.qint8, inplace=True)
    else:
        raise ValueError(f"reward.frozen_weights={kind!r}: no copy to make (float16 or int8)")
    head = base.get_output_embeddings()
    if not head._forward_pre_hooks:  # a strided input would copy the head's weight per call
        contiguous_head_input(base)
    own = hf_model(policy).get_input_embeddings()
    if own.weight.dtype == torch.float32:
        # Frozen and float32 already: no second copy (nor of a float head tied to it).
        if isinstance(head, nn.Linear) and head.weight is base.get_input_embeddings().weight:
            head.weight = own.weight
        base.set_input_embeddings(own)
    return base
