"""Fine-tuning the offline judge: MiniLM-L6 as a 3-way cross-encoder on the synthetic pairs.

:func:`train_nli` trains and saves one checkpoint; :func:`ensure_judge` is the explicit
training step (``contraq nli-train``, ``make demo``, the test fixtures): it trains
``<cache>/nli/<name>`` once, other processes wait on a file lock and reuse it. Reward loading
(:func:`contraq.judge.scorer.load_scorer`) never trains.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from transformers import (
    AutoTokenizer,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from contraq.files import resolve_path
from contraq.judge.cache import configured_path, is_complete, save_checkpoint, training_lock
from contraq.judge.config import NLITrainConfig
from contraq.judge.datasets import PROBE_SET, build_datasets
from contraq.judge.evaluation import (
    encode,
    evaluate_pairs,
    print_metrics,
    score_hand_probes,
    score_probe_file,
)
from contraq.judge.pairs import TRAIN_LABELS, NLIPair
from contraq.lm.packaged import minilm_dir
from contraq.threads import torch_threads


@dataclass
class NLITrainResult:
    """What :func:`train_nli` produced: the checkpoint directory and its metrics
    (``heldout``, ``ood`` per file, ``train`` sizes, ``seconds``)."""

    path: Path
    metrics: dict[str, Any]

    @property
    def heldout_accuracy(self) -> float:
        return float(self.metrics["heldout"]["accuracy"])


def _base_model(cfg: NLITrainConfig) -> tuple[Any, Any]:
    """(tokenizer, BertForSequenceClassification with a new 3-way head) of the base model."""
    base = str(resolve_path(cfg.base_model)) if cfg.base_model else str(minilm_dir())
    tok = AutoTokenizer.from_pretrained(base)
    model = BertForSequenceClassification.from_pretrained(
        base,
        num_labels=len(TRAIN_LABELS),
        id2label=dict(enumerate(TRAIN_LABELS)),
        label2id={name: i for i, name in enumerate(TRAIN_LABELS)},
    )
    return tok, model


def _fit(
    model: Any, tok: Any, feats: list[dict[str, Any]], cfg: NLITrainConfig, verbose: bool
) -> None:
    """``cfg.epochs`` epochs over ``feats`` with ``transformers.Trainer``: AdamW (no weight
    decay on biases and LayerNorm weights), linear warm-up then decay, gradient clipping, and
    length-grouped batches (less padding, still random order). Nothing is saved on the way:
    the caller saves the finished model with its metrics."""
    with tempfile.TemporaryDirectory(prefix="contraq-judge-") as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            num_train_epochs=cfg.epochs,
            per_device_train_batch_size=cfg.batch_size,
            learning_rate=cfg.lr,
            weight_decay=cfg.weight_decay,
            warmup_steps=cfg.warmup_ratio,  # a float below 1: a share of the steps
            lr_scheduler_type="linear",
            max_grad_norm=cfg.grad_clip,
            optim="adamw_torch",
            train_sampling_strategy="group_by_length",
            seed=cfg.seed,
            data_seed=cfg.seed,
            save_strategy="no",
            logging_strategy="epoch",
            report_to="none",
            disable_tqdm=not verbose,
            dataloader_pin_memory=False,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=_Features(feats),
            data_collator=DataCollatorWithPadding(tok),
        )
        trainer.train()
    model.eval()


class _Features(torch.utils.data.Dataset):
    """The encoded pairs as a map-style dataset (``Trainer``'s length grouping reads
    ``input_ids``)."""

    def __init__(self, feats: list[dict[str, Any]]) -> None:
        self.feats = feats

    def __len__(self) -> int:
        return len(self.feats)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.feats[i]


def _judge_metrics(
    model: Any,
    tok: Any,
    cfg: NLITrainConfig,
    held: list[NLIPair],
    ood: dict[str, list[NLIPair]],
    console: Console,
) -> dict[str, Any]:
    """Held-out, hack-probe, hand-probe and out-of-domain metrics of the trained model."""
    metrics: dict[str, Any] = {"heldout": evaluate_pairs(model, tok, held, cfg.max_length)}
    print_metrics(console, "held-out subjects", metrics["heldout"])
    probes = ood.pop(PROBE_SET)
    metrics["probes"] = evaluate_pairs(model, tok, probes, cfg.max_length) if probes else None
    console.print(
        f"hack probes (all neutral): {metrics['probes'] and metrics['probes']['accuracy_by_kind']}"
    )
    metrics["hand_probes"] = score_probe_file(model, tok, cfg.hand_probes, cfg.max_length)
    if metrics["hand_probes"]:
        print_metrics(console, "hand-written probes", metrics["hand_probes"])
    for key in ("near_probes", "relation_probes"):
        metrics[key] = score_probe_file(model, tok, getattr(cfg, key), cfg.max_length)
        if metrics[key]:
            print_metrics(console, f"hand-written {key.replace('_', ' ')}", metrics[key])
    metrics["probe_scores"] = score_hand_probes(model, tok, cfg.max_length)
    for pr in metrics["probe_scores"]:
        console.print(
            f"  P(contra)={pr['probs']['contradiction']:.3f} want {pr['expected']}: "
            f"{pr['premise']!r} / {pr['hypothesis']!r}"
        )
    metrics["ood"] = {}
    for name, pairs in ood.items():
        # Out-of-domain sentences are longer: score them with a larger budget.
        metrics["ood"][name] = evaluate_pairs(model, tok, pairs, max(cfg.max_length, 128))
        print_metrics(console, name, metrics["ood"][name])
    return metrics


def train_nli(cfg: Any = None, *, force: bool = True, verbose: bool = True) -> NLITrainResult:
    """Fine-tune the offline NLI judge and save it as an HF checkpoint.

    A ``BertForSequenceClassification`` initialised from MiniLM-L6 (new 3-way head,
    ``id2label = {0: entailment, 1: neutral, 2: contradiction}``) is trained with AdamW and
    linear warm-up/decay on :func:`build_datasets`'s pairs, then evaluated on held-out
    subjects (and SNLI/MNLI samples when present). The directory holds the model,
    tokenizer and ``metrics.json``.

    Args:
        cfg: anything :meth:`NLITrainConfig.from_any` reads.
        force: replace an existing checkpoint (else an existing one is kept).
        verbose: print the progress bar and metric tables.
    """
    cfg = NLITrainConfig.from_any(cfg)
    out = cfg.output_dir()
    console = Console(quiet=not verbose)
    t0 = time.perf_counter()
    with torch_threads(cfg.num_threads if cfg.num_threads > 0 else None):
        torch.manual_seed(cfg.seed)
        train, held, ood, sizes = build_datasets(cfg)
        console.print(f"[bold]NLI judge[/bold] {cfg.name}: {sizes}")
        tok, model = _base_model(cfg)
        _fit(model, tok, encode(tok, train, cfg.max_length), cfg, verbose)
        train_s = time.perf_counter() - t0
        metrics: dict[str, Any] = {"name": cfg.name, "config": asdict(cfg), "sizes": sizes}
        metrics.update(_judge_metrics(model, tok, cfg, held, ood, console))
        metrics["seconds"] = {"train": train_s, "total": time.perf_counter() - t0}
        metrics["torch_threads"] = torch.get_num_threads()
        if metrics["heldout"]["accuracy"] < cfg.min_heldout_accuracy:
            console.print(
                f"[red]held-out accuracy {metrics['heldout']['accuracy']:.3f} is below "
                f"{cfg.min_heldout_accuracy}[/red]"
            )
        model.config.name_or_path = str(out)
        if out.exists() and not force and is_complete(out):
            console.print(f"kept the existing checkpoint {out}")
        else:
            save_checkpoint(model, tok, metrics, out, replace=force)
        console.print(
            f"saved {out} in {metrics['seconds']['total']:.0f} s; held-out accuracy "
            f"{metrics['heldout']['accuracy']:.3f}"
        )
        return NLITrainResult(path=out, metrics=metrics)


def ensure_judge(cfg: Any = None, *, verbose: bool = True) -> Path:
    """The judge's checkpoint, trained first when missing: ``path`` of a ``configs/nli`` group
    when set (a local directory, or a hub id inside a ``Path``), else the offline judge of its
    ``train:`` section at ``<cache>/nli/<name>`` (trained once; other processes wait on a lock
    and reuse it)."""
    path = configured_path(cfg)
    if path is not None:
        return path
    tcfg = NLITrainConfig.from_any(cfg)
    out = tcfg.output_dir()
    if is_complete(out):
        return out
    with training_lock(out):
        if not is_complete(out):  # another process may have trained it meanwhile
            train_nli(tcfg, force=False, verbose=verbose)
    return out
