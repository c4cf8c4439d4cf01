"""Reproduces docs/EXPERIMENTS.md section 5's table "On the first 32 test facts" (one-off).

One Markdown row per evaluation folder: the trained policy's counted rate, facts covered and
diversity with 95% intervals, and its paired differences from T=0.5 and beam search.

Usage::

    python scripts/results_table.py docs/results/cf-genuine/eval-v8 docs/results/cf-vg/eval-v8

The baselines' rows come from the first folder (every folder of one comparison holds the same
baseline records: same facts, settings and judge).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _ci(summary: dict, key: str) -> str:
    return f"{summary[key]:.3f} [{summary[key + '_low']:.3f}, {summary[key + '_high']:.3f}]"


def _paired(comparisons: dict, method: str) -> str:
    c = comparisons.get(method)
    if not c:
        return ""
    return f"{c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}] (p {c['p_le_0']:.2f})"


def main(folders: list[str]) -> None:
    print(
        "| run | counted rate [95% CI] | facts covered [95% CI] | diversity | "
        "trained - T=0.5, paired | trained - beam, paired |"
    )
    print("|---|---|---|---|---|---|")
    first = None
    for folder in folders:
        result = json.loads((Path(folder) / "eval.json").read_text())
        first = first or result
        s, comp = result["summary"]["trained"], result["comparisons"]
        beam = next(m for m in result["summary"] if m.endswith("beam"))
        print(
            f"| {folder} | {_ci(s, 'genuine_rate')} | {_ci(s, 'coverage')} | "
            f"{s['diversity']:.3f} | {_paired(comp, 'untrained_T0.5')} | {_paired(comp, beam)} |"
        )
        # The trained policy at other temperatures (eval trained_temperatures=[...]): compared
        # with the untrained policy at the same temperature instead of T=0.5.
        for method, matched in (result.get("matched") or {}).items():
            t, ms = method.removeprefix("trained_T"), result["summary"][method]
            print(
                f"| {folder}, T={t} | {_ci(ms, 'genuine_rate')} | {_ci(ms, 'coverage')} | "
                f"{ms['diversity']:.3f} | vs T={t}: {_paired(matched, 'untrained_T' + t)} | "
                f"{_paired(matched, beam)} |"
            )
    for name, s in first["summary"].items():
        if not name.startswith("trained"):
            print(
                f"| {name} | {_ci(s, 'genuine_rate')} | {_ci(s, 'coverage')} | "
                f"{s['diversity']:.3f} | | |"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
