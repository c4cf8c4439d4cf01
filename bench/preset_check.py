"""The GPU preset's code path without the model hub (``experiment=gpu-gpt2-large``).

Builds the preset's two architectures from the configs committed under ``configs/archs/``
(random weights, any size), writes them as Hugging Face folders, points ``model.name_or_path``
and ``nli.path`` at those folders and runs one real training step through the same pieces as
``contraq train`` (:class:`contraq.run.parts.Parts`,
:class:`contraq.training.module.GFlowNetModule`, a Lightning ``Trainer``): KV-cached sampling, answers by the base LM (the policy with adapters
disabled), the NLI judge, the TB or modified SubTB loss, backward and the optimizer step.

Used by ``bench/bench_fullsize.py`` (real sizes) and by the normal test suite (tiny sizes).

Stand-in tokenizers (the real ones need the hub): SmolLM2's BPE tokenizer (49,152 tokens, chat
template removed so prompts take GPT-2's raw-text path) for gpt2-large, whose 50,257-row
embedding is kept at its real size; MiniLM-L6's WordPiece tokenizer (30,522 tokens) for DeBERTa.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)

from contraq.config.schema import LossConfig, TrainConfig, compose_run, load_group
from contraq.data import load_split
from contraq.files import REPO_ROOT
from contraq.judge.scorer import contradiction_index
from contraq.lm.models import load_smollm2_tokenizer
from contraq.lm.packaged import minilm_dir, save_converted
from contraq.run.parts import Parts, build_prompts
from contraq.training.module import GFlowNetModule
from contraq.training.step import StepBatch
from contraq.training.train import step_loader

ARCHS_DIR = REPO_ROOT / "configs" / "archs"
CONFIGS_DIR = REPO_ROOT / "configs"
PRESET = "gpu-gpt2-large"
LM_ARCH = "gpt2-large"
NLI_ARCH = "deberta-v3-large"


# --------------------------------------------------------------------------- architectures


def arch_dict(name: str, **overrides: Any) -> dict[str, Any]:
    """``configs/archs/<name>.json`` (comment keys dropped) with ``overrides`` applied."""
    data = json.loads((ARCHS_DIR / f"{name}.json").read_text())
    data = {k: v for k, v in data.items() if not k.startswith("_")}
    data.update(overrides)
    return data


def arch_config(name: str, **overrides: Any) -> PretrainedConfig:
    """A transformers config of the committed architecture ``name`` (see :func:`arch_dict`)."""
    data = arch_dict(name, **overrides)
    return AutoConfig.for_model(data.pop("model_type"), **data)


def random_model(config: PretrainedConfig, seed: int = 0) -> PreTrainedModel:
    """Random weights for ``config``: a causal LM, or a sequence classifier when the config
    names ``*ForSequenceClassification``. The caller's global RNG is left untouched."""
    archs = getattr(config, "architectures", None) or []
    is_cls = any("SequenceClassification" in a for a in archs)
    cls = AutoModelForSequenceClassification if is_cls else AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls.from_config(config)


def lm_stand_in_tokenizer() -> Any:
    """SmolLM2's tokenizer without its chat template: gpt2-large has none, so the prompts and
    answers take the raw-text / few-shot path the real preset takes."""
    tok = load_smollm2_tokenizer()
    tok.chat_template = None
    return tok


def nli_stand_in_tokenizer() -> Any:
    """MiniLM-L6's WordPiece tokenizer (ids < 30,522 fit any NLI vocabulary used here)."""
    return AutoTokenizer.from_pretrained(str(minilm_dir()))


def _digest(*parts: Any) -> str:
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=6).hexdigest()


def write_random_weights(
    root: str | Path, lm: dict[str, Any], nli: dict[str, Any], seed: int = 0
) -> tuple[Path, Path]:
    """Save random ``lm`` / ``nli`` architectures (dicts of :func:`arch_dict`) with the
    stand-in tokenizers as HF folders under ``root``; reused when already there (the folder
    names hold a digest of the architecture). Returns ``(lm_dir, nli_dir)``."""
    root = Path(root)
    out = []
    for kind, data, make_tok in (
        ("lm", lm, lm_stand_in_tokenizer),
        ("nli", nli, nli_stand_in_tokenizer),
    ):
        target = root / f"{kind}-{data.get('model_type')}-{_digest(data, seed)}"
        if not (target / "config.json").is_file():
            tok = make_tok()
            cfg = dict(data)
            if kind == "lm":  # the stand-in tokenizer's special ids, like a real checkpoint
                ids = {"bos_token_id", "eos_token_id", "pad_token_id"}
                cfg.update({k: getattr(tok, k) for k in ids})
            else:
                cfg["pad_token_id"] = tok.pad_token_id
            model = random_model(AutoConfig.for_model(cfg.pop("model_type"), **cfg), seed)
            save_converted(model, tok, target)
            del model
        out.append(target)
    return out[0], out[1]


def preset_config(lm_dir: str | Path, nli_dir: str | Path, *overrides: str) -> DictConfig:
    """``contraq train experiment=gpu-gpt2-large`` with the local folders, as Hydra composes it."""
    return compose_run(
        CONFIGS_DIR,
        [f"experiment={PRESET}", f"model.name_or_path={lm_dir}", f"nli.path={nli_dir}", *overrides],
    )


# --------------------------------------------------------------------------- checks


def check_gpt2_lora(policy: torch.nn.Module, rank: int) -> int:
    """Check that LoRA wraps exactly GPT-2's attention Conv1D layers (``attn.c_attn``,
    ``attn.c_proj``; not ``mlp.c_proj``) of every block, and return the trainable count,
    which must equal ``rank * (fan_in + fan_out)`` summed over them."""
    from peft.tuners.lora import LoraLayer
    from transformers.pytorch_utils import Conv1D

    n_layer = int(policy.config.n_layer)
    wrapped = {n: m for n, m in policy.named_modules() if isinstance(m, LoraLayer)}
    suffixes = sorted({".".join(n.split(".")[-2:]) for n in wrapped})
    if suffixes != ["attn.c_attn", "attn.c_proj"] or len(wrapped) != 2 * n_layer:
        raise RuntimeError(
            f"GPT-2 LoRA wraps {len(wrapped)} modules {suffixes}, expected "
            f"attn.c_attn + attn.c_proj in each of {n_layer} blocks"
        )
    expected = 0
    for name, m in wrapped.items():
        base = m.get_base_layer()
        if not isinstance(base, Conv1D) or not m.fan_in_fan_out:
            raise RuntimeError(
                f"{name}: base {type(base).__name__}, fan_in_fan_out="
                f"{m.fan_in_fan_out}; expected a Conv1D with fan_in_fan_out"
            )
        fan_in, fan_out = base.weight.shape  # Conv1D stores [in, out]
        expected += rank * (fan_in + fan_out)
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    if trainable != expected or trainable == 0:
        raise RuntimeError(f"GPT-2 LoRA: {trainable} trainable parameters, expected {expected}")
    return trainable


def check_judge(parts: Parts) -> int:
    """The judge's contradiction index from its config (the MNLI order puts it at 2), and the
    reward's LM is the policy itself: one copy of the weights."""
    reward = parts.reward()
    idx = contradiction_index(reward.nli.model.config)
    if idx != reward.nli.contradiction_idx or reward.nli.labels[idx] != "contradiction":
        raise RuntimeError(f"judge labels {reward.nli.labels}: contradiction index {idx}")
    if reward.policy is not parts.policy:
        raise RuntimeError("the reward holds a second LM: expected the policy itself")
    return idx


def param_counts(parts: Parts, module: GFlowNetModule | None = None) -> dict[str, int]:
    """Parameters per component: frozen base LM, LoRA, log Z head, judge."""
    lora = sum(p.numel() for n, p in parts.policy.named_parameters() if "lora_" in n)
    total = sum(p.numel() for p in parts.policy.parameters())
    counts = {"base": total - lora, "lora": lora}
    if module is not None:
        counts["log_z_head"] = sum(p.numel() for p in module.log_z_head.parameters())
    counts["judge"] = sum(p.numel() for p in parts.reward().nli.model.parameters())
    return counts


# --------------------------------------------------------------------------- one step


class SavedActivations:
    """Bytes autograd saves for backward, each storage once, in three parts: parameters are
    skipped; ``weight_cast_bytes``: a parameter's shape in another dtype (bf16 copies of the
    frozen weights under autocast: they scale with the model, not the batch); ``vocab_bytes``:
    vocabulary-wide tensors (logits, log-softmax: last dim == ``vocab``); ``other_bytes``: the
    rest (hidden states). Use as ``saved_tensors_hooks(meter.pack, meter.unpack)``."""

    def __init__(self, vocab: int, params: Iterator[torch.nn.Parameter]) -> None:
        self.vocab = vocab
        params = list(params)
        self.seen = {p.untyped_storage().data_ptr() for p in params}
        self.param_shapes = {(tuple(p.shape), p.dtype) for p in params}
        self.shapes = {s for s, _ in self.param_shapes}
        self.vocab_bytes = 0
        self.weight_cast_bytes = 0
        self.other_bytes = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() in self.seen:
            return t
        self.seen.add(storage.data_ptr())
        shape = tuple(t.shape)
        if shape in self.shapes and (shape, t.dtype) not in self.param_shapes:
            self.weight_cast_bytes += storage.nbytes()
        elif t.dim() and t.shape[-1] == self.vocab:
            self.vocab_bytes += storage.nbytes()
        else:
            self.other_bytes += storage.nbytes()
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t


@dataclass
class StepReport:
    """What one training step did and cost."""

    loss_name: str
    loss: float
    batch: int  # questions
    prompt_width: int  # P
    action_width: int  # T
    seconds: dict[str, float] = field(default_factory=dict)  # per phase
    saved_vocab_bytes: int = 0
    saved_other_bytes: int = 0
    saved_weight_cast_bytes: int = 0
    lora_changed: bool = False
    log_z_changed: bool = False
    judge_calls: int = 0


class _Phases(L.Callback):
    """Times the step's phases and tells ``on_phase`` (e.g. a memory meter) where it is."""

    def __init__(self, on_phase: Callable[[str], None]) -> None:
        self.on_phase = on_phase
        self.marks: list[tuple[str, float]] = []

    def mark(self, name: str) -> None:
        self.on_phase(name)
        self.marks.append((name, time.perf_counter()))

    def on_before_backward(self, trainer: L.Trainer, pl_module: Any, loss: Any) -> None:
        self.mark("backward_and_step")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        self.mark("end")

    def seconds(self) -> dict[str, float]:
        return {a: tb - ta for (a, ta), (_, tb) in zip(self.marks, self.marks[1:], strict=False)}


def build_module(cfg: DictConfig, parts: Parts, n_facts: int = 8) -> GFlowNetModule:
    """The run's Lightning module, built as ``run_training`` builds it (first training facts)."""
    train = load_split(cfg.data).train[:n_facts]
    from contraq.buffer import build_buffer

    return GFlowNetModule(
        policy=parts.policy,
        tokenizer=parts.tokenizer,
        facts=train,
        prompts=build_prompts(cfg, train, parts.tokenizer),
        reward=parts.reward(),
        buffer=build_buffer(cfg.buffer),
        sampler_cfg=parts.sampler_cfg,
        cfg=load_group(cfg, "train", TrainConfig),
        loss_cfg=load_group(cfg, "loss", LossConfig),
        seed=int(cfg.seed),
    )


def _trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    kw = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(kw, dict)
    kw.update(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    return kw


def run_step(
    cfg: DictConfig, parts: Parts, on_phase: Callable[[str], None] = lambda _: None
) -> StepReport:
    """One training step of ``cfg`` (its ``loss``, ``trainer`` and batch sizes) on ``parts``
    through Lightning's ``Trainer.fit``: sample, reward (answers + judge; every prefix for
    SubTB), teacher-forced loss with the saved-activation meter on, backward, optimizer step."""
    module = build_module(cfg, parts)
    before = {k: v.detach().clone() for k, v in module.trainable_state_dict().items()}
    calls0 = parts.reward().nli.n_forward_calls
    phases = _Phases(on_phase)
    meter = SavedActivations(parts.policy.config.vocab_size, parts.policy.parameters())
    seen: dict[str, Any] = {}
    make_batch, compute_loss = module.make_batch, module.compute_loss

    def timed_make_batch(*args: Any, **kwargs: Any) -> StepBatch:
        phases.mark("sample_and_reward")
        seen["data"] = make_batch(*args, **kwargs)
        return seen["data"]

    def metered_loss(sb: StepBatch) -> Any:
        phases.mark("loss_forward")
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            loss, extra = compute_loss(sb)
        seen["loss"] = float(loss.detach())
        return loss, extra

    module.make_batch, module.compute_loss = timed_make_batch, metered_loss  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(**_trainer_kwargs(cfg), callbacks=[phases], default_root_dir=tmp)
        trainer.fit(module, train_dataloaders=step_loader(module))
    after = module.trainable_state_dict()
    changed = {
        k: not torch.equal(before[k], after[k].detach().to(before[k].device)) for k in before
    }
    batch = seen["data"].batch
    return StepReport(
        loss_name=str(cfg.loss.name),
        loss=seen["loss"],
        batch=int(batch.actions.shape[0]),
        prompt_width=int(batch.prompt_ids.shape[1]),
        action_width=int(batch.actions.shape[1]),
        seconds=phases.seconds(),
        saved_vocab_bytes=meter.vocab_bytes,
        saved_other_bytes=meter.other_bytes,
        saved_weight_cast_bytes=meter.weight_cast_bytes,
        lora_changed=any(v for k, v in changed.items() if "lora_" in k),
        log_z_changed=any(v for k, v in changed.items() if "log_z_head" in k),
        judge_calls=parts.reward().nli.n_forward_calls - calls0,
    )


@torch.no_grad()
def score_pass(cfg: DictConfig, parts: Parts, device: torch.device) -> dict[str, Any]:
    """Scoring only (no grad): sample one batch, answer, judge, re-score log P_F in one
    teacher-forced pass; in whatever dtype ``parts`` was loaded with."""
    from contraq.lm.sampling import score_actions

    parts.policy.to(device)
    reward = parts.reward()
    reward.nli.model.to(device)
    reward.nli.device = device
    module = build_module(cfg, parts).to(device)
    c = module.cfg
    t0 = time.perf_counter()
    gen = torch.Generator(device=device).manual_seed(0)
    fact_ids = list(range(c.facts_per_step))
    batch = module.sample_questions(fact_ids, c.n_samples, 1.0, gen)
    facts = [module.facts[i] for i in fact_ids for _ in range(c.n_samples)]
    out = reward.terminal(facts, batch)
    log_pf, _ = score_actions(
        parts.policy, batch.prompt_ids, batch.prompt_mask, batch.actions, parts.sampler_cfg
    )
    if not (torch.isfinite(out.log_r).all() and torch.isfinite(log_pf).all()):
        raise RuntimeError("non-finite log R or log P_F in the scoring pass")
    return {
        "seconds": time.perf_counter() - t0,
        # The sampler's log P_F against the teacher-forced pass (equal up to dtype rounding).
        "log_pf_max_abs_diff": float((log_pf - batch.log_pf).abs().max()),
        "dtype": str(next(parts.policy.parameters()).dtype),
        "judge_dtype": str(next(reward.nli.model.parameters()).dtype),
        "questions": out.questions,
        "answers": out.answers,
        "log_c": out.components["log_c"].tolist(),
    }
