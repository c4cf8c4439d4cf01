"""The judge's training and evaluation sets: fact pairs split by subject, a share of SNLI,
out-of-domain SNLI/MNLI samples and the held-out reward-hack probes; and the reader of labelled
NLI JSON Lines files (SNLI/MNLI, the hand-written ``data/judge_probes.jsonl``)."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

from contraq.files import REPO_ROOT, iter_jsonl, resolve_path
from contraq.judge.config import NLITrainConfig
from contraq.judge.facts import FactRow, heldout_subject, read_fact_rows
from contraq.judge.pairs import TRAIN_LABELS, NLIPair, PairBuilder
from contraq.judge.vocab import split_hack_vocab

PROBE_SET = "hack_probes"  # key of the reward-hack probes among build_datasets' extra sets


def shared_nli_dir(cfg: NLITrainConfig) -> Path | None:
    """``cfg.shared_nli_dir``, else ``../shared/data/nli`` beside the current folder or the
    repository when present, else ``None``."""
    if cfg.shared_nli_dir:
        path = resolve_path(cfg.shared_nli_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"shared_nli_dir {path} is not a directory")
        return path
    for cand in (Path.cwd().parent / "shared/data/nli", REPO_ROOT.parent / "shared/data/nli"):
        if cand.is_dir():
            return cand
    return None


def read_nli_pairs(path: str | os.PathLike[str]) -> list[NLIPair]:
    """Pairs of a JSON Lines NLI file (premise, hypothesis, label in
    entailment|neutral|contradiction); rows with another label ("-") are skipped."""
    path = Path(path)
    out: list[NLIPair] = []
    for lineno, rec in iter_jsonl(path):
        for key in ("premise", "hypothesis", "label"):
            if not isinstance(rec.get(key), str):
                raise ValueError(f"{path}:{lineno}: field {key!r} must be a string")
        if rec["label"] in TRAIN_LABELS:
            kind = str(rec.get("kind") or path.stem)
            out.append(NLIPair(rec["premise"], rec["hypothesis"], rec["label"], kind))
    return out


def _fact_pairs(
    cfg: NLITrainConfig, rng: random.Random
) -> tuple[list[NLIPair], list[NLIPair], list[NLIPair], dict[str, Any]]:
    """(train, held-out, hack probes, sizes) built from the edit facts of ``cfg.facts``."""
    rows: list[FactRow] = []
    for p in cfg.facts:
        rows += read_fact_rows(resolve_path(p))
    builder = PairBuilder(rows)
    train_rows = [r for r in rows if not heldout_subject(r.subject, cfg.heldout_fraction, cfg.seed)]
    seen = {r.subject.lower() for r in train_rows}
    builder.swap_subjects = sorted({r.subject for r in train_rows})
    held_names = {r.subject.lower() for r in rows} - seen
    builder.swap_famous = [s for s in builder.swap_famous if s.lower() not in held_names]
    held_rows = [r for r in rows if heldout_subject(r.subject, cfg.heldout_fraction, cfg.seed)]
    if not train_rows or not held_rows:
        raise ValueError(
            f"subject split left {len(train_rows)} train and {len(held_rows)} held-out facts; "
            f"change heldout_fraction ({cfg.heldout_fraction})"
        )
    train: list[NLIPair] = []
    for r in train_rows:
        # Role relations are rare but carry the contrast of the descriptive neutrals
        # ("X was a lawyer" contradicts "X's occupation was judge"): twice the pairs.
        reps = 2 if builder.role_like[builder.rel[id(r)]] else 1
        for side in ("edited", "original") * reps:
            train += builder.pairs_for(
                r,
                rng,
                premise_side=side,
                per_class=cfg.per_class,
                subject_swap=cfg.subject_swap,
                overlap_swap=cfg.overlap_swap,
                near_share=cfg.near_share,
            )
    rng.shuffle(train)
    train = train[: cfg.max_train_pairs]
    held: list[NLIPair] = []
    held_rng = random.Random(cfg.seed + 1)
    for r in held_rows:
        held += builder.pairs_for(r, held_rng, premise_side="edited", per_class=2)
    held_rng.shuffle(held)
    held = held[: cfg.max_eval_pairs]
    # Hack-shape probes on held-out subjects, worded with the held-out vocabulary only.
    held_vocab = split_hack_vocab()[1]
    probe_rng = random.Random(cfg.seed + 3)
    probes = [p for r in held_rows for p in builder.probe_pairs(r, probe_rng, held_vocab)]
    sizes: dict[str, Any] = {
        "facts": len(rows),
        "relations": builder.n_relations(),
        "train_subjects": len({r.subject.lower() for r in train_rows}),
        "heldout_subjects": len({r.subject.lower() for r in held_rows}),
        "train_fact_pairs": len(train),
    }
    return train, held, probes, sizes


def build_datasets(
    cfg: NLITrainConfig,
) -> tuple[list[NLIPair], list[NLIPair], dict[str, list[NLIPair]], dict[str, Any]]:
    """(train pairs, held-out fact pairs, extra evaluation sets, sizes). Deterministic given
    ``cfg.seed``; held-out subjects (:func:`heldout_subject`) never reach training.

    The extra sets are the SNLI/MNLI samples per file stem (when present) and, under
    :data:`PROBE_SET`, the reward-hack probes of :meth:`PairBuilder.probe_pairs` (all
    neutral, held-out subjects and held-out vocabulary)."""
    rng = random.Random(cfg.seed)
    train, held, probes, sizes = _fact_pairs(cfg, rng)
    ood: dict[str, list[NLIPair]] = {}
    shared = shared_nli_dir(cfg)
    sizes["shared_nli_dir"] = str(shared) if shared else None
    if shared is not None:
        snli = shared / cfg.snli_train_file
        if cfg.snli_train_pairs > 0 and snli.is_file():
            extra = read_nli_pairs(snli)
            rng.shuffle(extra)
            train += extra[: cfg.snli_train_pairs]
            sizes["train_snli_pairs"] = min(len(extra), cfg.snli_train_pairs)
        for name in cfg.ood_eval_files:
            path = shared / name
            if path.is_file():
                pairs = read_nli_pairs(path)
                random.Random(cfg.seed + 2).shuffle(pairs)
                ood[path.stem] = pairs[: cfg.ood_eval_pairs]
    rng.shuffle(train)
    sizes["train_pairs"] = len(train)
    sizes["heldout_pairs"] = len(held)
    sizes["probe_pairs"] = len(probes)
    ood[PROBE_SET] = probes
    return train, held, ood, sizes
