"""The GPU preset's code path (gpt2 policy + DeBERTa-v2 MNLI judge) at tiny size, no hub.

The architectures are the committed ``configs/archs`` ones shrunk in-process; the weights go
through ``model.name_or_path`` / ``nli.path`` as local Hugging Face folders, exactly as a user's
downloaded gpt2-large and DeBERTa-v3-large would.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from contraq.judge.scorer import NLIScorer, load_scorer
from contraq.lm.models import ModelConfig, load_model_and_tokenizer
from contraq.run.parts import Parts

# bench/preset_check.py is a bench tool, not part of the installed package: loaded from its file
# (registered under its name first: dataclasses look their module up in sys.modules).
_PATH = Path(__file__).resolve().parents[1] / "bench" / "preset_check.py"
_spec = importlib.util.spec_from_file_location("preset_check", _PATH)
pc = importlib.util.module_from_spec(_spec)
sys.modules["preset_check"] = pc
_spec.loader.exec_module(pc)

TINY_LM = {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 256}
TINY_NLI = {
    "num_hidden_layers": 2,
    "hidden_size": 32,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "pooler_hidden_size": 32,
    "position_buckets": 16,
}
# Small batches and short questions: the test is about the wiring, not the numbers.
STEP = (
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
    "train.facts_per_step=2",
    "train.n_samples=2",
    "sampler.min_len=2",
    "sampler.max_len=5",
    "reward.answer_max_new_tokens=6",
)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("preset")
    return pc.write_random_weights(
        root, pc.arch_dict(pc.LM_ARCH, **TINY_LM), pc.arch_dict(pc.NLI_ARCH, **TINY_NLI)
    )


@pytest.fixture(scope="module")
def tiny_parts(tiny_dirs: tuple[Path, Path]) -> Parts:
    return Parts(pc.preset_config(*tiny_dirs, *STEP))


def test_committed_architectures_have_the_published_sizes() -> None:
    with torch.device("meta"):  # shapes only: no memory, no time
        lm = pc.random_model(pc.arch_config(pc.LM_ARCH))
        nli = pc.random_model(pc.arch_config(pc.NLI_ARCH))
    assert sum(p.numel() for p in lm.parameters()) == 774_030_080  # gpt2-large
    assert 435_000_000 < sum(p.numel() for p in nli.parameters()) < 435_100_000
    assert nli.config.model_type == "deberta-v2" and nli.config.num_labels == 3
    assert pc.contradiction_index(nli.config) == 2


def test_preset_loads_local_folders(tiny_dirs: tuple[Path, Path], tiny_parts: Parts) -> None:
    lm_dir, nli_dir = tiny_dirs
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in lm_dir.iterdir()
    }
    cfg = tiny_parts.cfg
    assert cfg.model.source == "hub" and cfg.nli.name == "deberta-v3-large-mnli"
    assert tiny_parts.policy.config.model_type == "gpt2"
    assert tiny_parts.policy.config.n_layer == TINY_LM["n_layer"]
    judge = tiny_parts.reward().nli
    assert judge.model.config.model_type == "deberta-v2" and judge.contradiction_idx == 2
    assert pc.check_judge(tiny_parts) == 2
    # The same folders through the explicit local source / a bare NLIScorer.
    model, _ = load_model_and_tokenizer(ModelConfig(source="local", name_or_path=str(lm_dir)))
    assert model.config.n_embd == TINY_LM["n_embd"]
    assert NLIScorer(nli_dir).labels == ["entailment", "neutral", "contradiction"]


def test_gpt2_lora_targets_are_the_attention_conv1d_layers(tiny_parts: Parts) -> None:
    r = int(tiny_parts.cfg.model.lora_r)
    n = pc.check_gpt2_lora(tiny_parts.policy, r)
    h = TINY_LM["n_embd"]
    assert n == TINY_LM["n_layer"] * r * ((h + 3 * h) + (h + h))


def test_lora_check_fails_when_targets_miss_the_attention(tiny_dirs: tuple[Path, Path]) -> None:
    parts = Parts(pc.preset_config(*tiny_dirs, *STEP, "model.lora_target_modules=[c_fc]"))
    with pytest.raises(RuntimeError, match="attn.c_attn"):
        pc.check_gpt2_lora(parts.policy, 8)


@pytest.mark.parametrize("loss", ["tb", "subtb"])
def test_one_gpu_preset_step_trains(tiny_dirs: tuple[Path, Path], loss: str) -> None:
    # SubTB's prefixes have no batch to share a reward with (config checks refuse w_share).
    share = ["reward.w_share=0"] if loss == "subtb" else []
    cfg = pc.preset_config(*tiny_dirs, *STEP, f"loss={loss}", *share)
    parts = Parts(cfg)
    # The preset recomputes activations in backward (25.3 GiB -> 6.5 GiB on an H100: docs/EXPERIMENTS.md).
    assert (
        cfg.model.gradient_checkpointing
        and parts.policy.base_model.model.is_activation_checkpointing
    )
    phases: list[str] = []
    report = pc.run_step(cfg, parts, on_phase=phases.append)
    assert phases == ["sample_and_reward", "loss_forward", "backward_and_step", "end"]
    assert report.loss_name == loss and torch.isfinite(torch.tensor(report.loss))
    assert report.batch == 4 and report.action_width <= 5
    assert report.lora_changed, "the optimizer step did not move LoRA"
    assert report.log_z_changed == (loss == "tb")
    assert report.judge_calls >= 1
    assert report.saved_weight_cast_bytes == 0  # float32 on CPU: no autocast copies
    assert report.saved_vocab_bytes >= 4 * report.batch * report.action_width * 50257
    assert report.saved_other_bytes > 0
    counts = pc.param_counts(parts)
    assert counts["lora"] > 0 and counts["base"] > counts["lora"] and counts["judge"] > 0


def test_bf16_scoring_pass(tiny_dirs: tuple[Path, Path]) -> None:
    cfg = pc.preset_config(*tiny_dirs, *STEP, "model.dtype=bfloat16", "nli.dtype=bfloat16")
    parts = Parts(cfg)
    out = pc.score_pass(cfg, parts, torch.device("cpu"))
    assert out["dtype"] == out["judge_dtype"] == "torch.bfloat16"
    assert len(out["answers"]) == 4 and all(c <= 0 for c in out["log_c"])
    assert out["log_pf_max_abs_diff"] < 0.5  # bf16 rounding, not a different computation


def test_local_nli_folder_without_config_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nli.path"):
        load_scorer({"path": str(tmp_path), "batch_size": 4, "max_length": 64})


def test_quantization_key_is_validated_and_refused_without_cuda_or_bitsandbytes(
    tiny_dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="model.quantization='2bit'"):
        ModelConfig(quantization="2bit")
    with pytest.raises(ValueError, match=r"model.quantization='8bit'.*source='tiny'"):
        load_model_and_tokenizer(ModelConfig(source="tiny", quantization="8bit"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = pc.preset_config(*tiny_dirs, *STEP, "model.quantization=4bit")
    with pytest.raises(ValueError, match=r"model.quantization='4bit'.*no CUDA device"):
        Parts(cfg)
