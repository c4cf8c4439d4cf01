"""The set per fact of one method in two eval folders (same facts), paired over facts: e.g.
two training recipes, both drawn without replacement (contraq.evaluation.yields).

    python scripts/paired_sets.py docs/results/set-b0/eval32 docs/results/set-a/eval32 \
        --method trained_distinct --budget 32

prints, per kind (distinct counted contradictions, meaning clusters, judge-free named), the
difference A - B and the ratio A / B of the means over facts with 95% bootstrap intervals.
"""

from __future__ import annotations

import argparse

from contraq.evaluation.yields import KINDS, fact_yields, yield_summary
from contraq.files import iter_jsonl
from contraq.lm.embedding import Embedder


def records(folder: str, method: str) -> list[dict]:
    rows = [r for _, r in iter_jsonl(f"{folder}/questions.jsonl") if r["method"] == method]
    if not rows:
        raise SystemExit(f"{folder}: no {method} records")
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="eval folder A (questions.jsonl or .jsonl.gz)")
    ap.add_argument("b", help="eval folder B, on the same facts")
    ap.add_argument("--method", default="trained_distinct")
    ap.add_argument("--budget", type=int, default=32)
    args = ap.parse_args(argv)
    embed = Embedder(device="cpu").encode
    ya = fact_yields(records(args.a, args.method), [args.budget], embed)
    yb = fact_yields(records(args.b, args.method), [args.budget], embed)
    s = yield_summary({"A": ya, "B": yb}, "A")
    for kind in KINDS:
        c = s["compare"]["B"][str(args.budget)][kind]
        print(
            f"{kind:9s} A - B {c['diff']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}]  "
            f"A / B {c['ratio']:.2f}x [{c['ratio_low']:.2f}, {c['ratio_high']:.2f}]"
        )


if __name__ == "__main__":
    main()
