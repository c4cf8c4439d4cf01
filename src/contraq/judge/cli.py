"""``contraq nli-train``: the explicit training step of the offline judge (a fast no-op when
its checkpoint exists)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from contraq.files import REPO_ROOT
from contraq.judge.cache import is_complete
from contraq.judge.config import NLITrainConfig

DEFAULT_CONFIG = REPO_ROOT / "configs" / "nli" / "minilm-zsre.yaml"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="contraq nli-train",
        description="Fine-tune MiniLM-L6 as the offline NLI judge of the contradiction reward.",
    )
    ap.add_argument(
        "--config",
        default=None,
        help="YAML with the training keys or a configs/nli group (default: configs/nli/minilm-zsre.yaml when present)",
    )
    ap.add_argument("--out", help="checkpoint directory (default: <cache>/nli/<name>)")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--max-train-pairs", type=int)
    ap.add_argument("--shared-nli-dir", help="folder with snli_*.jsonl / mnli_*.jsonl")
    ap.add_argument("--threads", type=int, help="torch threads (0: leave as is)")
    ap.add_argument("--force", action="store_true", help="retrain even when the checkpoint exists")
    return ap


def cli_main(argv: list[str] | None = None) -> int:
    """``contraq nli-train``: train the offline judge (see ``--help``)."""
    args = _parser().parse_args(argv)
    cfg_path = args.config or DEFAULT_CONFIG
    raw: Any = {}
    if args.config or Path(cfg_path).is_file():
        raw = OmegaConf.to_container(OmegaConf.load(str(cfg_path)), resolve=True)
        if isinstance(raw, Mapping) and "train" in raw:
            raw = raw["train"] or {}
    tcfg = NLITrainConfig.from_any(raw)
    for key, val in (
        ("out", args.out),
        ("epochs", args.epochs),
        ("seed", args.seed),
        ("max_train_pairs", args.max_train_pairs),
        ("shared_nli_dir", args.shared_nli_dir),
        ("num_threads", args.threads),
    ):
        if val is not None:
            setattr(tcfg, key, val)
    out = tcfg.output_dir()
    if is_complete(out) and not args.force:
        print(f"{out} exists (use --force to retrain)")
        return 0
    # Imported here: a present judge answers above without loading torch and transformers.
    from contraq.judge.training import train_nli

    res = train_nli(tcfg, force=True)
    print(f"held-out accuracy {res.heldout_accuracy:.4f} -> {res.path}")
    return 0
