"""Shared fixtures: SmolLM2's tokenizer, tiny random policies and the real SmolLM2 policy.

Fixture names are part of the team contract (other modules' tests use them):
``smol_tokenizer``, ``tiny_llama``, ``tiny_gpt2`` (random 2-layer models with SmolLM2's
vocabulary, LoRA attached with non-zero B so the policy differs from the base),
``smollm2`` (the real SmolLM2-135M-Instruct + LoRA, slow), ``tiny_nli_dir`` (a random tiny
NLI judge, :func:`save_tiny_nli`) and ``trained_judge_dir`` (the default offline judge,
trained once when the cache lacks it). Session-scoped: a test that changes
a model (train mode, gradient checkpointing, weights) must restore it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification  # noqa: E402

from contraq.judge.training import ensure_judge  # noqa: E402
from contraq.lm.models import (  # noqa: E402
    ModelConfig,
    attach_lora,
    build_tiny_model,
    load_model_and_tokenizer,
    load_smollm2_tokenizer,
)
from contraq.lm.packaged import minilm_dir

REPO = Path(__file__).resolve().parents[1]
# Neither the hub order nor ours, and contradiction not last: the scorer must read id2label.
TINY_NLI_LABELS = {0: "neutral", 1: "contradiction", 2: "entailment"}

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
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.sample_writer.every_n_steps=1",
        "~callbacks.progress_bar",
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


def save_tiny_nli(
    path: Path, id2label: dict[int, str] = TINY_NLI_LABELS, num_layers: int = 2
) -> Path:
    """Save a random BertForSequenceClassification (hidden 32, seed 0) with MiniLM's
    tokenizer at ``path``: a judge for the mechanics, not the numbers."""
    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=len(id2label),
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def embedder():
    """The real all-MiniLM-L6-v2 sentence embedder (metrics' diversity, the novelty term)."""
    from contraq.lm.embedding import Embedder

    return Embedder(device="cpu")


@pytest.fixture(scope="session")
def tiny_nli_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer 3-way judge (labels :data:`TINY_NLI_LABELS`) with MiniLM's tokenizer."""
    return save_tiny_nli(tmp_path_factory.mktemp("tiny_nli"))


@pytest.fixture(scope="session")
def trained_judge_dir() -> Path:
    """The default offline judge (configs/nli/minilm-zsre.yaml): the cached checkpoint, trained
    once (minutes) when the cache lacks it, as `contraq nli-train` does."""
    return ensure_judge(OmegaConf.load(REPO / "configs" / "nli" / "minilm-zsre.yaml"))
