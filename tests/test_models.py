"""Model loading, LoRA, the base-model context, dropout and the SmolLM2 conversion cache."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

import contraq.lm.models as models
import contraq.lm.packaged as packaged
from contraq.lm.models import (
    ModelConfig,
    attach_lora,
    base_model,
    build_tiny_model,
    contiguous_head_input,
    disable_dropout,
    load_model_and_tokenizer,
    termination_token_id,
)
from contraq.lm.packaged import save_converted, smollm2_hf_dir

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"


def _inputs(tokenizer):
    enc = tokenizer(["What is the capital of", "Hi"], return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


def test_termination_token_id(smol_tokenizer):
    assert termination_token_id(smol_tokenizer, "?") == smol_tokenizer.convert_tokens_to_ids("?")
    with pytest.raises(ValueError, match=r"'What is\?'.*smollm2|smollm2.*'What is\?'") as err:
        termination_token_id(smol_tokenizer, "What is?")
    assert "encodes to 3 tokens" in str(err.value)


@pytest.mark.parametrize(
    ("arch", "expected", "not_expected"),
    [
        ("llama", {"q_proj", "k_proj", "v_proj", "o_proj"}, {"gate_proj", "up_proj", "down_proj"}),
        ("gpt2", {"attn.c_attn", "attn.c_proj"}, {"mlp.c_proj", "mlp.c_fc"}),
    ],
)
def test_lora_target_modules_per_arch(arch, expected, not_expected, request):
    policy = request.getfixturevalue(f"tiny_{arch}")
    wrapped = {
        name.rsplit(".lora_A", 1)[0] for name, _ in policy.named_parameters() if ".lora_A." in name
    }
    suffixes = {
        ".".join(name.split(".")[-2:]) if arch == "gpt2" else name.split(".")[-1]
        for name in wrapped
    }
    assert suffixes == expected
    assert not suffixes & not_expected
    assert len(wrapped) == 2 * len(expected)  # two layers
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_lora_target_override(smol_tokenizer):
    model = build_tiny_model("llama", smol_tokenizer)
    policy = attach_lora(
        model, ModelConfig(source="tiny", lora_target_modules=["v_proj"], lora_r=4)
    )
    shapes = {n: p.shape for n, p in policy.named_parameters() if "lora_A" in n}
    assert len(shapes) == 2 and all("v_proj" in n and s[0] == 4 for n, s in shapes.items())


def test_base_model_context_gives_base_logits(tiny_llama, smol_tokenizer):
    ids, mask = _inputs(smol_tokenizer)
    plain = build_tiny_model("llama", smol_tokenizer, seed=0)  # same weights as the fixture's base
    with torch.no_grad():
        expected = plain(input_ids=ids, attention_mask=mask).logits
        policy_logits = tiny_llama(input_ids=ids, attention_mask=mask).logits
        with base_model(tiny_llama) as base:
            assert base is tiny_llama  # one copy of the weights
            base_logits = base(input_ids=ids, attention_mask=mask).logits
        after = tiny_llama(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(base_logits, expected)
    assert (policy_logits - expected).abs().max() > 1e-3  # LoRA B is non-zero in the fixture
    assert torch.equal(after, policy_logits)  # adapters back on


def test_base_model_needs_a_peft_model(smol_tokenizer):
    with pytest.raises(TypeError, match="PeftModel"), base_model(torch.nn.Linear(2, 2)):
        pass


def test_build_tiny_model_is_deterministic(smol_tokenizer):
    a = build_tiny_model("gpt2", smol_tokenizer, seed=3)
    b = build_tiny_model("gpt2", smol_tokenizer, seed=3)
    c = build_tiny_model("gpt2", smol_tokenizer, seed=4)
    wa, wb, wc = (m.transformer.h[0].attn.c_attn.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.config.vocab_size == len(smol_tokenizer) and a.config.n_layer == 2


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dropout_is_zero_in_train_mode(arch, smol_tokenizer):
    """GPT-2 configs default to 0.1 dropout everywhere; Llama reads a float attribute."""
    if arch == "gpt2":
        model = build_tiny_model("gpt2", smol_tokenizer)
    else:
        config = LlamaConfig(
            vocab_size=len(smol_tokenizer), hidden_size=32, intermediate_size=64,
            num_hidden_layers=1, num_attention_heads=2, attention_dropout=0.5,
        )  # fmt: skip
        model = disable_dropout(LlamaForCausalLM(config))
    policy = attach_lora(model, ModelConfig(source="tiny", tiny_arch=arch))
    policy.train()
    ids, mask = _inputs(smol_tokenizer)
    first = policy(input_ids=ids, attention_mask=mask).logits
    second = policy(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(first, second)
    assert all(m.p == 0 for m in policy.modules() if isinstance(m, torch.nn.Dropout))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lm_head_sees_a_contiguous_input(arch, smol_tokenizer):
    """transformers hands the head a strided slice of the hidden states (logits_to_keep);
    the loaded model copies it first (a CPU slow path otherwise), logits unchanged."""
    seen = []
    plain = build_tiny_model(arch, smol_tokenizer)
    raw = {k: v.clone() for k, v in plain.state_dict().items()}
    policy = attach_lora(plain, ModelConfig(source="tiny", tiny_arch=arch))
    head = policy.get_output_embeddings()
    head.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    ids, mask = _inputs(smol_tokenizer)
    kept = policy(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
    assert seen == [True] and kept.shape[1] == 1

    # The same model without the hook sees the strided slice, and gives the same logits.
    bare = type(plain)(plain.config)
    bare.load_state_dict(raw)
    bare.eval()
    seen.clear()
    bare.get_output_embeddings().register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous())
    )
    ref = bare(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
    assert seen == [False]
    torch.testing.assert_close(kept, ref)
    assert contiguous_head_input(bare) is bare


def test_load_tiny_via_config(smol_tokenizer):
    model, tok = load_model_and_tokenizer(ModelConfig(source="tiny", tiny_arch="gpt2"))
    assert not model.training and tok.padding_side == "left" and tok.pad_token_id is not None
    assert model.config.model_type == "gpt2" and model.config.vocab_size == len(smol_tokenizer)


def test_model_config_validation():
    with pytest.raises(ValueError, match="source"):
        ModelConfig(source="nope")
    with pytest.raises(ValueError, match="dtype"):
        ModelConfig(dtype="float64")
    with pytest.raises(ValueError, match="name_or_path"):
        ModelConfig(source="local")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_model_and_tokenizer(ModelConfig(source="local", name_or_path="/nonexistent/dir"))


def test_auto_dtype_is_bf16_only_on_a_cpu_with_amx(monkeypatch):
    """model.dtype=auto (the embedded default's): bfloat16 needs AMX (without it bfloat16 was
    no faster) and no GPU (where the trainer's precision decides)."""
    cases = [
        (False, True, torch.bfloat16),
        (False, False, torch.float32),
        (True, True, torch.float32),
    ]
    for gpu, native, expected in cases:
        monkeypatch.setattr(torch.cuda, "is_available", lambda gpu=gpu: gpu)
        monkeypatch.setattr(models, "cpu_has_amx", lambda native=native: native)
        assert ModelConfig(dtype="auto").torch_dtype == expected
    assert ModelConfig(dtype="bfloat16").torch_dtype == torch.bfloat16
    assert ModelConfig(dtype="float32").torch_dtype == torch.float32
    assert isinstance(models.cpu_has_amx(), bool)


def test_tiny_model_loads_in_auto_dtype_with_float32_lora(monkeypatch, smol_tokenizer):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "cpu_has_amx", lambda: True)
    cfg = ModelConfig(source="tiny", dtype="auto")
    model, _ = load_model_and_tokenizer(cfg)
    policy = attach_lora(model, cfg)
    lora = {p.dtype for n, p in policy.named_parameters() if p.requires_grad}
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16 and lora == {torch.float32}


def test_model_yaml_configs_match_dataclass():
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    names = {p.stem for p in CONFIG_DIR.glob("*.yaml")}
    assert {"smollm2", "gpt2-large", "tiny", "tiny-gpt2", "local"} <= names
    for path in CONFIG_DIR.glob("*.yaml"):
        raw = OmegaConf.load(path)  # only the choices: the rest are the dataclass's defaults
        assert set(raw.keys()) <= fields and "source" in raw, path.name
        if path.stem != "local":  # local's name_or_path comes from the user
            ModelConfig(**OmegaConf.to_container(raw, resolve=True))


def test_save_converted_is_safe_when_another_process_won(tmp_path, smol_tokenizer):
    model = build_tiny_model("llama", smol_tokenizer)
    target = tmp_path / "converted"
    save_converted(model, smol_tokenizer, target)
    first = (target / "model.safetensors").stat().st_mtime_ns
    save_converted(model, smol_tokenizer, target)  # the loser of a race: keeps the winner's
    assert (target / "model.safetensors").stat().st_mtime_ns == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]  # no temp dirs left
    loaded, tok = load_model_and_tokenizer(ModelConfig(source="local", name_or_path=str(target)))
    ids, mask = _inputs(tok)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids, attention_mask=mask).logits,
            model(input_ids=ids, attention_mask=mask).logits,
        )


@pytest.mark.slow
def test_smollm2_conversion_cache_is_reused(smollm2, monkeypatch):
    """Once converted (the fixture did it), loading never de-quantises the GGUF again."""
    cached = smollm2_hf_dir()
    assert (cached / "model.safetensors").is_file()

    def forbidden(*args, **kwargs):
        raise AssertionError("GGUF de-quantised although the cache exists")

    monkeypatch.setattr(packaged, "convert_gguf", forbidden)
    monkeypatch.setattr(packaged, "load_gguf", forbidden)
    monkeypatch.setattr(models, "load_gguf", forbidden)  # its own reference
    model, tok = load_model_and_tokenizer(ModelConfig(source="smollm2"))
    assert Path(model.config.name_or_path) == cached
    assert getattr(model.config, "quantization_config", None) is None
    assert tok.padding_side == "left" and tok.pad_token_id == tok.eos_token_id


@pytest.mark.slow
def test_smollm2_conversion_matches_gguf(smollm2, smol_tokenizer):
    """The safetensors cache holds exactly the de-quantised GGUF weights (one slow load)."""
    gguf = packaged.smollm2_gguf_path()
    direct, _ = load_model_and_tokenizer(ModelConfig(source="gguf", name_or_path=str(gguf)))
    cached, _ = load_model_and_tokenizer(ModelConfig(source="smollm2"))
    ids, mask = _inputs(smol_tokenizer)
    with torch.no_grad():
        a = direct(input_ids=ids, attention_mask=mask).logits
        b = cached(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_gradient_checkpointing_same_gradients_fewer_saved_activations(arch, smol_tokenizer):
    """``model.gradient_checkpointing`` (the GPU preset's memory fix) must not change the LoRA
    gradients, and must keep fewer tensors for backward in train mode (the loss's pass)."""
    ids = smol_tokenizer(["Where was Anatole France born?"], return_tensors="pt").input_ids

    def grads_and_saved(checkpointing: bool) -> tuple[list[torch.Tensor], int]:
        cfg = ModelConfig(source="tiny", tiny_arch=arch, gradient_checkpointing=checkpointing)
        policy = attach_lora(build_tiny_model(arch, smol_tokenizer, seed=0), cfg)
        g = torch.Generator().manual_seed(1)  # the same A and B (!= 0) in both policies
        for p in (p for n, p in policy.named_parameters() if "lora_" in n):
            torch.nn.init.normal_(p, std=0.1, generator=g)
        policy.train()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel()) or t, lambda t: t
        ):
            logits = policy(input_ids=ids).logits
        torch.log_softmax(logits, -1)[0, :-1].gather(1, ids[0, 1:, None]).sum().backward()
        lora = [p for n, p in policy.named_parameters() if p.requires_grad]
        assert lora and all(p.grad is not None for p in lora)
        return [p.grad for p in lora], sum(saved)

    plain, plain_saved = grads_and_saved(False)
    ckpt, ckpt_saved = grads_and_saved(True)
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert ckpt_saved < plain_saved
