"""Reproduces docs/EXPERIMENTS.md section 6's on-subject columns (reward.div_gate=subject runs).

How much of a method's diversity comes from questions that leave the edit's subject.

For each method of an eval folder: the share of its questions that name the edit's subject in
full (:func:`contraq.genuine.names_subject`), the diversity of all its questions per fact (the
eval's measure), and the diversity among only the questions that name the subject (facts with
at least two of them). If even the untrained policy's on-subject questions stay below a
diversity target, the target can be met only by leaving the subject.

    python scripts/subject_diversity.py docs/results/cf-t12-160-s1/eval89-v9 [more folders]
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from contraq.evaluation.metrics import grouped_diversity
from contraq.evaluation.reuse import read_eval_folder
from contraq.genuine import names_subject
from contraq.lm.embedding import Embedder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", help="eval folders (questions.jsonl, eval.json)")
    args = ap.parse_args()
    embedder = Embedder()
    print("folder | method | names the subject | diversity | diversity of those naming it")
    for folder in args.folders:
        _, by_method = read_eval_folder(Path(folder), "folder")
        for method, recs in by_method.items():
            every: dict[int, list[str]] = defaultdict(list)
            named: dict[int, list[str]] = defaultdict(list)
            for r in recs:
                every[int(r["fact_index"])].append(str(r["question"]))
                if names_subject(str(r["question"]), str(r["subject"])):
                    named[int(r["fact_index"])].append(str(r["question"]))
            share = sum(len(v) for v in named.values()) / len(recs)
            div = grouped_diversity(list(every.values()), embedder)
            div_named = grouped_diversity(list(named.values()), embedder)
            print(f"{folder} | {method} | {share:.3f} | {div:.3f} | {div_named:.3f}")


if __name__ == "__main__":
    main()
