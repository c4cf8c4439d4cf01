"""Metrics of a judge being trained: per-class scores on labelled pairs, the hand-written probe
file, and the class probabilities of the hand probes (``metrics.json`` of a checkpoint)."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from contraq.files import resolve_path
from contraq.judge.datasets import read_nli_pairs
from contraq.judge.pairs import TRAIN_LABELS, NLIPair
from contraq.judge.vocab import hand_probes

LABEL_ID = {name: i for i, name in enumerate(TRAIN_LABELS)}


def classification_metrics(
    gold: Sequence[int], pred: Sequence[int], labels: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1 (0 where undefined), macro F1 over all classes
    and the confusion matrix (rows = gold) of class ids ``gold`` / ``pred``, both ``[N]``."""
    k = len(labels)
    g, p = torch.tensor(list(gold), dtype=torch.long), torch.tensor(list(pred), dtype=torch.long)
    conf = multiclass_confusion_matrix(p, g, num_classes=k)
    per_metric = {
        name: fn(p, g, num_classes=k, average=None).tolist()
        for name, fn in (
            ("precision", multiclass_precision),
            ("recall", multiclass_recall),
            ("f1", multiclass_f1_score),
        )
    }
    support = conf.sum(1).tolist()
    per = {
        name: {**{m: v[i] for m, v in per_metric.items()}, "support": support[i]}
        for i, name in enumerate(labels)
    }
    n = len(g)
    accuracy = multiclass_accuracy(p, g, num_classes=k, average="micro").item() if n else 0.0
    return {
        "n": n,
        "accuracy": accuracy,
        "per_class": per,
        "macro_f1": sum(per_metric["f1"]) / k,
        "confusion": conf.tolist(),
    }


def encode(tok: Any, pairs: Sequence[NLIPair], max_length: int) -> list[dict[str, Any]]:
    """Token ids of each pair (no padding) with its ``labels`` id (:data:`TRAIN_LABELS`)."""
    enc = tok(
        [p.premise for p in pairs],
        [p.hypothesis for p in pairs],
        truncation=True,
        max_length=max_length,
        padding=False,
    )
    return [
        {**{k: enc[k][i] for k in enc}, "labels": LABEL_ID[p.label]} for i, p in enumerate(pairs)
    ]


def predict(model: Any, tok: Any, pairs: Sequence[NLIPair], max_length: int) -> list[int]:
    """Argmax class ids (in TRAIN_LABELS order) of ``pairs``, batched by length."""
    feats = encode(tok, pairs, max_length)
    order = sorted(range(len(feats)), key=lambda i: len(feats[i]["input_ids"]))
    pred = [0] * len(feats)
    model.eval()
    with torch.inference_mode():
        for s in range(0, len(order), 64):
            idx = order[s : s + 64]
            batch = tok.pad(
                [{k: v for k, v in feats[i].items() if k != "labels"} for i in idx],
                return_tensors="pt",
            )
            logits = model(**{k: v.to(model.device) for k, v in batch.items()}).logits
            for i, p in zip(idx, logits.argmax(-1).tolist(), strict=True):
                pred[i] = p
    return pred


def evaluate_pairs(
    model: Any, tok: Any, pairs: Sequence[NLIPair], max_length: int
) -> dict[str, Any]:
    """:func:`classification_metrics` of ``model`` on ``pairs`` plus ``accuracy_by_kind``."""
    pred = predict(model, tok, pairs, max_length)
    res = classification_metrics([LABEL_ID[p.label] for p in pairs], pred, TRAIN_LABELS)
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for p, y in zip(pairs, pred, strict=True):
        by_kind[p.kind].append(LABEL_ID[p.label] == y)
    res["accuracy_by_kind"] = {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}
    return res


def score_hand_probes(model: Any, tok: Any, max_length: int) -> list[dict[str, Any]]:
    """Class probabilities of the hand probes (:func:`contraq.judge.vocab.hand_probes`),
    ``max_length`` tokens per pair."""
    probes = hand_probes()
    enc = tok(
        [p for p, _, _ in probes],
        [h for _, h, _ in probes],
        truncation=True,
        max_length=max_length,
        padding=True,
        return_tensors="pt",
    )
    model.eval()
    with torch.inference_mode():
        probs = torch.softmax(model(**{k: v.to(model.device) for k, v in enc.items()}).logits, -1)
    out = []
    for (prem, hyp, want), row in zip(probes, probs.float().tolist(), strict=True):
        scores = dict(zip(TRAIN_LABELS, row, strict=True))
        out.append({"premise": prem, "hypothesis": hyp, "expected": want, "probs": scores})
    return out


def score_probe_file(
    model: Any, tok: Any, path: str | os.PathLike[str] | None, max_length: int
) -> dict[str, Any] | None:
    """Accuracy, per-class precision/recall and accuracy per ``kind`` of a judge on a
    hand-written probe file (:func:`read_nli_pairs` schema plus ``kind``); ``None`` when
    ``path`` is unset or missing."""
    if not path:
        return None
    resolved = resolve_path(path)
    if not resolved.is_file():
        return None
    res = evaluate_pairs(model, tok, read_nli_pairs(resolved), max(max_length, 128))
    res["file"] = str(resolved)
    return res


def print_metrics(console: Any, title: str, res: dict[str, Any]) -> None:
    """A rich table of per-class precision, recall, F1 and support."""
    from rich.table import Table

    table = Table(title=f"{title}: accuracy {res['accuracy']:.3f} (n={res['n']})")
    for col in ("class", "precision", "recall", "F1", "support"):
        table.add_column(col)
    for name, v in res["per_class"].items():
        table.add_row(
            name, f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}", str(v["support"])
        )
    console.print(table)
