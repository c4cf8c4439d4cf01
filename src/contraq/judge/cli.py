"""``contraq nli-train``: the explicit training step of the offline judge (a fast no-op when
its checkpoint exists). Its settings: ``configs/nli-train.yaml`` (the nli group's ``train:``
node), composed and typed by :mod:`contraq.cli`."""

from __future__ import annotations

from pathlib import Path

from contraq.judge.cache import is_complete
from contraq.judge.config import NLITrainConfig


def nli_train(tcfg: NLITrainConfig, force: bool = False) -> Path:
    """Train the judge of ``tcfg`` into its output folder, unless a complete checkpoint is
    there already (``force`` retrains); returns the folder."""
    out = tcfg.output_dir()
    if is_complete(out) and not force:
        print(f"{out} exists (force=true retrains)")
        return out
    # Imported here: a present judge answers above without loading torch and transformers.
    from contraq.judge.training import train_nli

    res = train_nli(tcfg, force=True)
    print(f"held-out accuracy {res.heldout_accuracy:.4f} -> {res.path}")
    return res.path
