"""Shared fixtures: SmolLM2's tokenizer, tiny random policies and the real SmolLM2 policy.

Fixture names are part of the team contract (other modules' tests use them):
``smol_tokenizer``, ``tiny_llama``, ``tiny_gpt2`` (random 2-layer models with SmolLM2's
vocabulary, LoRA attached with non-zero B so the policy differs from the base) and
``smollm2`` (the real SmolLM2-135M-Instruct + LoRA, slow). Session-scoped: a test that changes
a model (train mode, gradient checkpointing, weights) must restore it.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from contraq.models import (  # noqa: E402
    ModelConfig,
    attach_lora,
    build_tiny_model,
    load_model_and_tokenizer,
    load_smollm2_tokenizer,
)

torch.manual_seed(0)


def smoke_train_cmd(out: os.PathLike[str] | str, *overrides: str) -> list[str]:
    """``contraq train experiment=smoke`` into ``out`` as a subprocess command: checkpoints every
    2 steps, samples every step, no progress bar; ``overrides`` are appended (they win)."""
    return [
        sys.executable,
        "-m",
        "contraq.cli",
        "train",
        "experiment=smoke",
        f"output_dir={out}",
        "callbacks.checkpoint_every_n_steps=2",
        "callbacks.samples_every_n_steps=1",
        "callbacks.progress_bar=none",
        *overrides,
    ]


def randomize_lora_b(policy: torch.nn.Module, seed: int = 0, std: float = 0.5) -> None:
    """Give LoRA's B matrices (zero at init) random values so policy != base."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def _tiny_policy(arch: str, tokenizer) -> torch.nn.Module:
    model = build_tiny_model(arch, tokenizer, seed=0)
    policy = attach_lora(model, ModelConfig(source="tiny", tiny_arch=arch))
    randomize_lora_b(policy)
    policy.eval()
    return policy


@pytest.fixture(scope="session")
def smol_tokenizer():
    """SmolLM2's tokenizer (left padding, pad = eos)."""
    return load_smollm2_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama(smol_tokenizer):
    """Random 2-layer LlamaForCausalLM (hidden 64) + LoRA with non-zero B, eval mode."""
    return _tiny_policy("llama", smol_tokenizer)


@pytest.fixture(scope="session")
def tiny_gpt2(smol_tokenizer):
    """Random 2-layer GPT2LMHeadModel (hidden 64) + LoRA with non-zero B, eval mode."""
    return _tiny_policy("gpt2", smol_tokenizer)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct + LoRA (B random, small), eval mode; its tokenizer is
    ``smol_tokenizer``. The first run converts the GGUF into the cache (~20 s); later runs
    load safetensors (< 1 s)."""
    model, _ = load_model_and_tokenizer(ModelConfig(source="smollm2"))
    policy = attach_lora(model, ModelConfig(source="smollm2"))
    randomize_lora_b(policy, std=0.02)
    policy.eval()
    return policy
