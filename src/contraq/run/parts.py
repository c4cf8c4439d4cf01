"""What every command builds from a run config: the policy (base LM + LoRA or a saved
adapter), its tokenizer, the sampler settings, the question prompts, the reward (with its
judge) and the split of the facts. `contraq train` builds them once; `sample`, `eval`,
`smooth` and the preset check rebuild them from a run folder's ``config.yaml``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from peft import PeftModel
from torch import nn

from contraq.config.checks import ConfigError
from contraq.config.schema import SamplerOptions, load_group
from contraq.data import EditFact, FactSplit, encode_prompts, load_split, question_prompt
from contraq.errors import UserError
from contraq.judge.scorer import load_scorer
from contraq.lm.float16_copy import float16_policy_copy, resolve_sample_weights
from contraq.lm.models import (
    ModelConfig,
    attach_lora,
    load_model_and_tokenizer,
    quiet_loading,
    termination_token_id,
)
from contraq.lm.sampling import SamplerConfig, default_banned_token_ids
from contraq.reward.build import build_reward

log = logging.getLogger(__name__)


def model_config(cfg: DictConfig) -> ModelConfig:
    return load_group(cfg, "model", ModelConfig)


def sampler_config(cfg: DictConfig, tokenizer: Any, term_id: int) -> SamplerConfig:
    """Sampler settings; banned: special tokens, every token containing a newline, and extras."""
    s = load_group(cfg, "sampler", SamplerOptions)
    banned = set(default_banned_token_ids(tokenizer, term_id))
    for text in s.extra_banned_tokens:
        banned.update(tokenizer.encode(text, add_special_tokens=False))
    banned.discard(term_id)
    return SamplerConfig(
        min_len=s.min_len,
        max_len=s.max_len,
        termination_token_id=term_id,
        top_k=s.top_k or None,
        top_p=s.top_p if s.top_p < 1.0 else None,
        banned_token_ids=sorted(banned),
        ban_penalty=s.ban_penalty,
        pad_token_id=int(tokenizer.pad_token_id),
    )


def use_chat(cfg: DictConfig, tokenizer: Any) -> bool:
    flag = cfg.prompt.use_chat_template
    if flag == "auto":
        return bool(getattr(tokenizer, "chat_template", None))
    return bool(flag)


def build_prompts(cfg: DictConfig, facts: Sequence[EditFact], tokenizer: Any) -> list[list[int]]:
    """Prompt token ids (unpadded) for each fact."""
    if not facts:
        return []
    chat = use_chat(cfg, tokenizer)
    template = cfg.prompt.template if chat else cfg.prompt.raw_template
    texts = [question_prompt(f, template, tokenizer, chat) for f in facts]
    ids, mask = encode_prompts(texts, tokenizer)
    return [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]


class AdapterError(UserError, ValueError):
    """A run's adapter/ cannot be loaded (truncated, another model's, not safe to read)."""


def load_adapter(model: Any, adapter_dir: Path) -> Any:
    """``PeftModel.from_pretrained`` of ``adapter_dir`` (read-only); a bad file is one line."""
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except Exception as e:  # peft, safetensors and torch raise many types for a bad file
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise AdapterError(
            f"{adapter_dir}: cannot load the adapter ({type(e).__name__}: {first}); relaunch "
            "the training to write it again, or pass checkpoint=RUN/checkpoints/last.ckpt"
        ) from None


class Parts:
    """Everything a command builds from a run config: model, tokenizer, reward, facts."""

    def __init__(
        self, cfg: DictConfig, *, with_lora: bool = True, adapter_dir: Path | None = None
    ) -> None:
        self.cfg = cfg
        mcfg = model_config(cfg)
        model, tokenizer = load_model_and_tokenizer(mcfg)
        if adapter_dir is not None:
            with quiet_loading():
                model = load_adapter(model, adapter_dir)
        elif with_lora:
            model = attach_lora(model, mcfg)
        self.policy = model
        self.tokenizer = tokenizer
        try:
            self.term_id = termination_token_id(tokenizer, mcfg.termination_token)
        except ValueError as e:
            raise ConfigError("model.termination_token", str(e)) from None
        self.sampler_cfg = sampler_config(cfg, tokenizer, self.term_id)
        self._reward = None
        self._sampler_lm: nn.Module | None = None

    def sample_weights(self) -> str:
        """The run's ``train.sample_weights`` resolved for this model: shared or float16."""
        choice = OmegaConf.select(self.cfg, "train.sample_weights", default="auto")
        return resolve_sample_weights(str(choice), self.policy)

    def sampler_lm(self) -> nn.Module:
        """What the sampling methods (and beam search) run: the policy or, under the run's
        ``train.sample_weights``, its float16 copy sharing the LoRA modules (made once)."""
        if self.sample_weights() == "shared":
            return self.policy
        if self._sampler_lm is None:
            self._sampler_lm = float16_policy_copy(self.policy)
        return self._sampler_lm

    def reward(self) -> Any:
        if self._reward is None:
            nli = None
            if self.cfg.reward.name == "contradiction":
                device = next(self.policy.parameters()).device
                nli = load_scorer(self.cfg.nli, device=device)
            self._reward = build_reward(
                self.cfg.reward, self.policy, self.tokenizer, self.term_id, nli=nli
            )
        return self._reward


def run_split(cfg: DictConfig) -> FactSplit:
    """The run's facts split by subject; a split that leaves no training fact is a
    ConfigError, an empty validation split only skips the `val/` metrics."""
    path = cfg.data.path
    split = load_split(cfg.data)
    if not split.train:
        n_facts = len(split.val) + len(split.test)
        raise ConfigError(
            "data.val_fraction",
            f"the split of {path} leaves no training fact ({n_facts} facts); lower "
            "data.val_fraction / data.test_fraction or use more subjects",
        )
    if not split.val and int(cfg.eval.n_facts) > 0:
        log.warning(
            "the validation split of %s is empty (data.val_fraction=%s): no val/ metrics; "
            "raise data.val_fraction, or set eval.n_facts=0 to silence this",
            path,
            cfg.data.val_fraction,
        )
    log.info(
        "facts: %d train, %d val, %d test (held out)",
        len(split.train),
        len(split.val),
        len(split.test),
    )
    return split
