"""The NLI judge of the contradiction reward, at reward time: inference only.

``log C(x) = log P_NLI(contradiction | premise = edit fact, hypothesis = answer)`` (docs/DESIGN.md
section 2). :class:`NLIScorer` wraps any Hugging Face sequence-classification checkpoint (a
local directory or a hub id); the label order is read from ``config.id2label``
(:func:`contradiction_index`), never assumed. :func:`load_scorer` never trains: the offline
judge comes from ``contraq nli-train`` (:mod:`contraq.judge.training`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PretrainedConfig

from contraq.judge.cache import cfg_get, judge_path
from contraq.lm.models import DTYPES, quiet_loading

# --------------------------------------------------------------------------- label indices


def _label_index(config: PretrainedConfig, prefixes: tuple[str, ...], what: str) -> int:
    id2label = getattr(config, "id2label", None) or {}
    hits = [
        int(i)
        for i, name in id2label.items()
        if any(str(name).strip().lower().startswith(p) for p in prefixes)
    ]
    if len(hits) != 1:
        labels = {int(i): str(n) for i, n in id2label.items()}
        found = "none" if not hits else f"{len(hits)}"
        raise ValueError(
            f"NLI model config ({getattr(config, 'name_or_path', '') or 'unnamed'}): {found} "
            f"label(s) match {what!r} in id2label={labels}; expected exactly one label starting "
            f"with {' or '.join(repr(p) for p in prefixes)} (case-insensitive)"
        )
    return hits[0]


def contradiction_index(config: PretrainedConfig) -> int:
    """Index of the contradiction class in ``config.id2label`` ("contradiction",
    "CONTRADICTION", "contradict", ...; case-insensitive). ValueError listing the labels
    when no label (or more than one) matches."""
    return _label_index(config, ("contradict",), "contradiction")


def entailment_index(config: PretrainedConfig) -> int:
    """Index of the entailment class in ``config.id2label`` (see :func:`contradiction_index`)."""
    return _label_index(config, ("entail",), "entailment")


def neutral_index(config: PretrainedConfig) -> int:
    """Index of the neutral class in ``config.id2label`` (see :func:`contradiction_index`)."""
    return _label_index(config, ("neutral",), "neutral")


# --------------------------------------------------------------------------- scorer


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"NLIScorer: unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


class NLIScorer:
    """Batched NLI judge over any HF sequence-classification checkpoint.

    Args:
        path_or_id: local checkpoint directory or hub id (e.g.
            ``MoritzLaurer/DeBERTa-v3-large-mnli-fever-anli-ling-wanli``; needs the hub or a
            local copy).
        device: where the judge runs; ``None`` = CUDA when available, else CPU.
        batch_size: pairs per forward call.
        max_length: token budget of ``premise + hypothesis`` (longest-first truncation).
        dtype: weights' dtype (``torch.dtype`` or "float32"/"bfloat16"/"float16"); ``None`` =
            float32. Outputs are float32 whatever the weights' dtype.

    Attributes:
        labels: class names in the model's output order (``config.id2label``).
        contradiction_idx: index of the contradiction class in ``labels``.
        n_forward_calls: number of model forward calls so far (one per batch).
    """

    def __init__(
        self,
        path_or_id: str | os.PathLike[str],
        device: str | torch.device | None = None,
        batch_size: int = 32,
        max_length: int = 256,
        dtype: torch.dtype | str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"NLIScorer: batch_size must be >= 1, got {batch_size}")
        if max_length < 8:
            raise ValueError(f"NLIScorer: max_length must be >= 8, got {max_length}")
        self.path_or_id = str(path_or_id)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        with quiet_loading():
            self.tokenizer = AutoTokenizer.from_pretrained(self.path_or_id)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                self.path_or_id, dtype=_resolve_dtype(dtype)
            )
        self.model.to(self.device).eval()
        cfg = self.model.config
        self.labels: list[str] = [str(cfg.id2label[i]) for i in range(cfg.num_labels)]
        self.contradiction_idx = contradiction_index(cfg)
        self.n_forward_calls = 0

    def logits(self, premises: Sequence[str], hypotheses: Sequence[str]) -> torch.Tensor:
        """Raw class logits, ``FloatTensor[N, C]`` (float32, on the scorer's device), in the
        model's label order; row ``i`` scores ``(premises[i], hypotheses[i])``.

        Pairs are sorted by token length and cut into batches of ``batch_size`` (less padding);
        rows come back in the input order.
        """
        if isinstance(premises, str) or isinstance(hypotheses, str):
            raise TypeError("NLIScorer: premises and hypotheses must be sequences of str")
        if len(premises) != len(hypotheses):
            raise ValueError(
                f"NLIScorer: {len(premises)} premises but {len(hypotheses)} hypotheses"
            )
        n = len(premises)
        out = torch.empty(n, len(self.labels), dtype=torch.float32, device=self.device)
        if n == 0:
            return out
        enc = self.tokenizer(
            list(premises),
            list(hypotheses),
            truncation=True,
            max_length=self.max_length,
            padding=False,
        )
        feats = [{k: enc[k][i] for k in enc} for i in range(n)]
        order = sorted(range(n), key=lambda i: len(feats[i]["input_ids"]))
        with torch.inference_mode():
            for start in range(0, n, self.batch_size):
                idx = order[start : start + self.batch_size]
                batch = self.tokenizer.pad([feats[i] for i in idx], return_tensors="pt")
                batch = {k: v.to(self.device) for k, v in batch.items()}
                self.n_forward_calls += 1
                logits = self.model(**batch).logits.float()
                out[torch.tensor(idx, device=self.device)] = logits
        return out

    def log_probs(self, premises: Sequence[str], hypotheses: Sequence[str]) -> torch.Tensor:
        """``log_softmax`` of :meth:`logits`: ``FloatTensor[N, C]`` (float32)."""
        return torch.log_softmax(self.logits(premises, hypotheses), dim=-1)

    def probs(self, premises: Sequence[str], hypotheses: Sequence[str]) -> torch.Tensor:
        """Class probabilities ``FloatTensor[N, C]`` in the order of :attr:`labels`."""
        return torch.softmax(self.logits(premises, hypotheses), dim=-1)

    def log_contradiction(self, premises: Sequence[str], hypotheses: Sequence[str]) -> torch.Tensor:
        """``log P(contradiction | premise_i, hypothesis_i)``: ``FloatTensor[N]`` (float32, on
        the scorer's device; ``<= 0``)."""
        return self.log_probs(premises, hypotheses)[:, self.contradiction_idx]


def load_scorer(nli_cfg: Any, device: str | torch.device | None = None) -> NLIScorer:
    """The scorer described by a ``configs/nli/*.yaml`` group (``path``, ``batch_size``,
    ``max_length``, ``dtype``, ``train``); UserError when its offline judge is not trained.

    ``path`` may be a hub id or a local Hugging Face folder (``config.json``, the weights as
    ``model.safetensors`` or ``pytorch_model.bin``, and the tokenizer files)."""
    path = judge_path(nli_cfg)
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"nli.path={str(path)!r}: a local folder without config.json; expected a Hugging "
            "Face sequence-classification folder (config.json, model.safetensors, tokenizer files)"
        )
    return NLIScorer(
        str(path),
        device=device,
        batch_size=int(cfg_get(nli_cfg, "batch_size", 32)),
        max_length=int(cfg_get(nli_cfg, "max_length", 256)),
        dtype=cfg_get(nli_cfg, "dtype", None),
    )
