"""A copy of the policy whose frozen ``nn.Linear`` weights are stored in float16, for the
sampler's passes on a CPU (``train.sample_weights``).

A KV-cached decode step of a small LM on a CPU is bound by reading every weight once per
token (SmolLM2-135M: 540 MB in float32), so the sampler runs faster when the frozen weights
take 2 bytes: PyTorch's dynamic float16 ``Linear`` (fbgemm, CPU only; AVX2 is enough) unpacks
them inside the matrix product, activations stay float32. The copy *shares* the policy's LoRA
modules (the same parameter tensors), so it samples from the policy as it is now, with no sync
after an optimizer step, and its input embeddings (float32 and frozen) are the policy's own.
Only sampling uses it: the loss's teacher-forced pass keeps the float32 weights, so the
gradient and the trajectory's log P_F are computed exactly as before; the draws differ from
float32 sampling only where float16 rounding moves a token (measured in
``bench/bench_step.py``).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from contraq.lm.forward import hf_model
from contraq.lm.models import contiguous_head_input

SAMPLE_WEIGHTS = ("auto", "shared", "float16")
LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


def cpu_float32(model: nn.Module) -> bool:
    """Whether ``model``'s first parameter is float32 on the CPU."""
    weight = next(model.parameters())
    return weight.device.type == "cpu" and weight.dtype == torch.float32


def resolve_sample_weights(choice: str, policy: nn.Module) -> str:
    """``shared`` or ``float16``: ``auto`` is ``float16`` for a float32 policy on the CPU."""
    if choice not in SAMPLE_WEIGHTS:
        raise ValueError(f"train.sample_weights={choice!r}: expected one of {SAMPLE_WEIGHTS}")
    if choice != "auto":
        return choice
    return "float16" if cpu_float32(policy) else "shared"


def float16_linears(model: nn.Module, names: set[str]) -> None:
    """Replace the named ``nn.Linear`` modules of ``model`` by dynamic float16 ones, in place."""
    qz = torch.ao.quantization
    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notice (still shipped)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        spec = dict.fromkeys(names, qz.float16_dynamic_qconfig)
        qz.quantize_dynamic(model, spec, dtype=torch.float16, inplace=True)


def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "base_layer")


def float16_policy_copy(policy: nn.Module) -> nn.Module:
    """A copy of ``policy`` (a peft LoRA model or a plain causal LM) in eval mode, without
    gradients, whose frozen ``nn.Linear`` weights (LoRA base layers and LM head included) are
    float16 and whose LoRA modules and input embeddings are ``policy``'s own objects.

    Raises ValueError when ``policy`` is not float32 on the CPU (the kernels are CPU-only and a
    2-byte model gains nothing).
    """
    if not cpu_float32(policy):
        weight = next(policy.parameters())
        raise ValueError(
            f"train.sample_weights=float16: the copy needs a float32 model on the CPU, not "
            f"{weight.dtype} on {weight.device} (use auto or shared)"
        )
    # Shared, not copied: deepcopy's memo maps the LoRA modules and the input embeddings to
    # themselves.
    own = [hf_model(policy).get_input_embeddings()]
    for m in policy.modules():
        if _is_lora_layer(m):
            own += [getattr(m, a) for a in LORA_PARTS if hasattr(m, a)]
    memo: dict[int, object] = {id(x): x for x in own}
    memo[id(own[0].weight)] = own[0].weight
    clone = copy.deepcopy(policy, memo)
    clone.eval()
    names = {
        name
        for name, m in clone.named_modules()
        if isinstance(m, nn.Linear) and ".lora_" not in f".{name}"
    }
    float16_linears(clone, names)
    head = hf_model(clone).get_output_embeddings()
    if isinstance(head, nn.Module) and not head._forward_pre_hooks:
        contiguous_head_input(hf_model(clone))  # a strided input would copy the head per call
    shared = {id(p) for n, p in policy.named_parameters() if "lora_" in n}
    for p in clone.parameters():
        if id(p) not in shared:
            p.requires_grad_(False)
    return clone
