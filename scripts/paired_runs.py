"""Paired bootstrap over facts of one evaluation's trained policy against another's (same facts,
settings and judge: e.g. two runs evaluated with `baselines_from` one eval folder).

    python scripts/paired_runs.py docs/results/cf-t12-160/eval-v9 docs/results/cf-t12/eval-v9

Prints the difference of the counted rate and of the judge-free independent rate (answer names
the pre-edit object), each with its 95% interval and P(diff <= 0).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from contraq.metrics import flag_counts
from contraq.stats import paired_bootstrap


def _records(folder: str, method: str) -> list[dict]:
    lines = (Path(folder) / "questions.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["method"] == method]


def main(a: str, b: str, method: str = "trained") -> None:
    mine, other = _records(a, method), _records(b, method)
    if [r["fact_index"] for r in mine] != [r["fact_index"] for r in other]:
        raise SystemExit(f"{a} and {b} do not hold the same facts in the same order")
    for key in ("genuine_rate", "independent_rate"):
        c = paired_bootstrap(flag_counts(mine, key), flag_counts(other, key))
        print(
            f"{key}: {a} - {b} = {c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}] "
            f"(P(diff<=0) {c['p_le_0']:.3f})"
        )


if __name__ == "__main__":
    main(*sys.argv[1:4])
