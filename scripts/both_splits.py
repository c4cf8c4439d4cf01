"""Counted rates over the union of two disjoint fact sets (the held-out test split and the
validation split), for several runs evaluated on both with the same baselines.

    python scripts/both_splits.py \\
        --pair docs/results/cf-t12-160/eval89-v9 docs/results/cf-t12-160/val-v9 \\
        --pair docs/results/cf-t12-160-s1/eval89-v9 docs/results/cf-t12-160-s1/val-v9

Each pair is one run's eval on the test split and on the validation split (``contraq eval
split=val``), each made with ``baselines_from`` one eval folder of that split, so every run's
baselines are the same records (checked). A fact of the union is (split, fact_index), and the
intervals resample the union's facts. Prints a Markdown table: each run's trained policy, every
run pooled (not for ``counted_distinct``: distinct among all runs' questions is a larger budget)
and each baseline, with its rate on each split and on both (95% bootstrap interval over facts),
whether its interval lies above every baseline's, and its paired difference with beam.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from contraq.config.checks import ConfigError
from contraq.evaluation.metrics import counted_texts, flag_counts
from contraq.evaluation.reuse import read_eval_folder
from contraq.evaluation.stats import bootstrap_rate, paired_bootstrap

# The counted rate; the answer names the pre-edit object; distinct counted questions per fact.
KEYS = ("genuine_rate", "independent_rate", "counted_distinct")


def _counts(records: list[dict], key: str) -> dict[int, tuple[float, int]]:
    """``{fact: (hits, questions)}`` of ``key``; for ``counted_distinct``, ``(distinct counted
    questions, 1)``, so the "rate" is their mean per fact."""
    if key == "counted_distinct":
        return {f: (float(len(texts)), 1) for f, texts in counted_texts(records).items()}
    return flag_counts(records, key)


# A union fact's index: split number x _STRIDE + its index in the split's eval.
_STRIDE = 1_000_000


def _union(folders: dict[str, Path]) -> dict[str, list[dict]]:
    """{method: records of both splits}, each record's fact renamed to (split, fact)."""
    out: dict[str, list[dict]] = {}
    for k, (split, folder) in enumerate(folders.items()):
        _, by_method = read_eval_folder(folder, split)
        for method, records in by_method.items():
            out.setdefault(method, []).extend(
                {**r, "fact_index": k * _STRIDE + int(r["fact_index"])} for r in records
            )
    return out


def _fmt(records: list[dict], key: str) -> tuple[str, float, float]:
    rate, low, high = bootstrap_rate(_counts(records, key))
    return f"{rate:.3f} [{low:.3f}, {high:.3f}]", low, high


def _split_rate(records: list[dict], k: int, key: str) -> str:
    part = [r for r in records if r["fact_index"] // _STRIDE == k]
    return _fmt(part, key)[0]


def _same_baselines(runs: dict[str, dict[str, list[dict]]], names: list[str]) -> None:
    """Every run holds the first run's baseline questions, answers and counts (log R may differ:
    ``baselines_from`` recomputes it under each run's reward)."""

    def key(records: list[dict] | None) -> list[tuple] | None:
        fields = ("fact_index", "question", "answer", "genuine")
        return None if records is None else [tuple(r.get(f) for f in fields) for r in records]

    first = next(iter(runs.values()))
    for run, methods in runs.items():
        for name in names:
            if key(methods.get(name)) != key(first[name]):
                raise SystemExit(f"{run}: its {name} records differ from the first run's")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--pair",
        nargs=2,
        action="append",
        required=True,
        metavar=("TEST", "VAL"),
        help="one run's eval folders on the test and the validation split",
    )
    ap.add_argument("--key", choices=KEYS, default=KEYS[0], help="the rate (default: counted)")
    ap.add_argument(
        "--method", default="trained", help="the runs' method to compare (e.g. trained_distinct)"
    )
    args = ap.parse_args(argv)
    try:
        runs = {test: _union({"test": Path(test), "val": Path(val)}) for test, val in args.pair}
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
    first = next(iter(runs.values()))
    baselines = [m for m in first if m != "trained" and not m.startswith("trained_")]
    _same_baselines(runs, baselines)
    key = args.key
    for run, methods in runs.items():
        if args.method not in methods:
            raise SystemExit(f"{run}: no {args.method} records")
    questions = flag_counts(first[args.method], "genuine_rate")
    per_fact = sum(n for _, n in questions.values()) / max(len(questions), 1)
    n_facts = len(_counts(first[args.method], key))
    print(
        f"| {args.method} ({n_facts} facts x {per_fact:.3g}), {key} | test | val | both [95% CI] | "
        "above every baseline's interval | minus beam, paired (both) |"
    )
    print("|---|---|---|---|---|---|")
    baseline_rates = {m: _fmt(first[m], key) for m in baselines}
    highest = max(high for _, _, high in baseline_rates.values())
    rows = {run: m[args.method] for run, m in runs.items()}
    if key != "counted_distinct":  # distinct among every run's questions is another budget
        rows["every run pooled"] = [r for m in runs.values() for r in m[args.method]]
    for name, records in rows.items():
        both, low, _ = _fmt(records, key)
        c = paired_bootstrap(_counts(records, key), _counts(first["beam"], key))
        print(
            f"| {name} | {_split_rate(records, 0, key)} | {_split_rate(records, 1, key)} | "
            f"{both} | {'yes' if low > highest else 'no'} ({low:.3f} vs {highest:.3f}) | "
            f"{c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}] |"
        )
    for name in baselines:
        records = first[name]
        print(
            f"| {name} | {_split_rate(records, 0, key)} | {_split_rate(records, 1, key)} | "
            f"{baseline_rates[name][0]} | | |"
        )


if __name__ == "__main__":
    main()
