"""Paired bootstrap over facts between trained policies of evaluations that hold the same facts,
settings and judge (e.g. runs evaluated with `baselines_from` one eval folder).

    python scripts/paired_runs.py docs/results/cf-t12-160/eval-v9 docs/results/cf-t12/eval-v9
    python scripts/paired_runs.py --against beam docs/results/cf-t12-160/eval-v9 \\
        docs/results/cf-t12-160-s1/eval-v9

    python scripts/paired_runs.py docs/results/cf-f4n4-s{0,1}/eval89-v9 \\
        --versus docs/results/cf-t12-160{,-s1,-v9}/eval89-v9

    python scripts/paired_runs.py docs/results/cf-div40/eval-v9 \\
        docs/results/cf-t12-160-v9/eval-v9-T13@trained_T1.3

The first form: the first folder's trained policy minus the second's (``FOLDER@METHOD`` takes
another method of a folder, e.g. the trained policy sampled hotter). The second form: the
trained policies of all folders pooled (two seeds: 16 questions per fact) minus the first
folder's ``--against`` method. The third: two recipes, each pooled over its runs' folders.
Each prints the difference of the counted rate and of the judge-free independent rate (answer
names the pre-edit object), its 95% interval and P(diff <= 0); the pooled forms first print
each side's rate with its 95% interval over facts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from contraq.evaluation.metrics import flag_counts
from contraq.evaluation.reuse import read_eval_folder
from contraq.evaluation.stats import bootstrap_rate, paired_bootstrap


def _records(folder: str, method: str) -> list[dict]:
    _, by_method = read_eval_folder(Path(folder), "folders")
    if method not in by_method:
        raise SystemExit(f"{folder} has no {method} records")
    return by_method[method]


def _method(spec: str) -> list[dict]:
    """``FOLDER`` (its trained policy) or ``FOLDER@METHOD``."""
    folder, _, method = spec.partition("@")
    return _records(folder, method or "trained")


def _pooled(folders: list[str]) -> list[dict]:
    """The trained policy's records of every folder, one list (questions per fact add up)."""
    return [r for f in folders for r in _method(f)]


def _facts(records: list[dict]) -> set[int]:
    return {r["fact_index"] for r in records}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--against", help="a method of the first folder (e.g. beam)")
    ap.add_argument("--versus", nargs="+", help="eval folders of the other recipe, pooled")
    args = ap.parse_args()
    if args.versus:
        mine, other = _pooled(args.folders), _pooled(args.versus)
        label = f"trained of {len(args.folders)} pooled - trained of {len(args.versus)} pooled"
    elif args.against:
        mine, other = _pooled(args.folders), _records(args.folders[0], args.against)
        label = f"trained of {len(args.folders)} folder(s) pooled - {args.against}"
    else:
        if len(args.folders) != 2:
            raise SystemExit("give two eval folders, or --against METHOD and one or more")
        mine, other = (_method(f) for f in args.folders)
        label = f"{args.folders[0]} - {args.folders[1]}"
    if _facts(mine) != _facts(other):
        raise SystemExit("the folders do not hold the same facts")
    for key in ("genuine_rate", "independent_rate"):
        if args.versus or args.against:  # each side's pooled rate and its interval over facts
            sides = []
            for records in (mine, other):
                rate, low, high = bootstrap_rate(flag_counts(records, key))
                sides.append(f"{rate:.3f} [{low:.3f}, {high:.3f}]")
            print(f"{key}: pooled {sides[0]} vs {sides[1]}")
        c = paired_bootstrap(flag_counts(mine, key), flag_counts(other, key))
        print(
            f"{key}: {label} = {c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}] "
            f"(P(diff<=0) {c['p_le_0']:.3f})"
        )


if __name__ == "__main__":
    main()
