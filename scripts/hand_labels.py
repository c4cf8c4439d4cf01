"""Precision of the judge's counted contradictions by hand: the share of hand-labelled counted
questions whose answer really contradicts the edit, per method, with a 95% Wilson interval, and
the counted rate times that share (an estimate of the real-contradiction rate).

    python scripts/hand_labels.py docs/results/cf-t12-160/hand_labels.jsonl docs/results/cf-t12-160/eval-v9

The labels file holds one JSON object per labelled question (``method``, ``real``); they were
labelled with the method hidden and the items shuffled (see docs/EXPERIMENTS.md for the protocol).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion k/n."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def main(labels_path: str, eval_dir: str) -> None:
    rows = [json.loads(line) for line in Path(labels_path).read_text().splitlines() if line]
    summary = json.loads((Path(eval_dir) / "eval.json").read_text())["summary"]
    print("| method | real / labelled | precision [95% CI] | counted rate | counted x precision |")
    print("|---|---|---|---|---|")
    table = []
    for method in sorted({r["method"] for r in rows}):
        real = [bool(r["real"]) for r in rows if r["method"] == method]
        k, n = sum(real), len(real)
        low, high = wilson(k, n)
        table.append([k, n - k])
        counted = summary[method]["genuine_rate"]
        print(
            f"| {method} | {k} / {n} | {k / n:.2f} [{low:.2f}, {high:.2f}] | {counted:.3f} | "
            f"{counted * k / n:.3f} |"
        )
    if len(table) == 2:
        from scipy.stats import fisher_exact  # a dependency of sentence-transformers

        print(f"\nFisher's exact test, two-sided: P = {fisher_exact(table).pvalue:.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
