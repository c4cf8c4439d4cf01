"""Reproduces docs/EXPERIMENTS.md section 5, "Stricter readings of counted" (one-off).

Stricter readings of the counted rate, to see whether a margin survives them.

A counted question (the judge's contradiction, a question, no echo) is re-read two ways:

- **subject**: the question names the edit's subject in full ("What is the native language of
  France?" does not name "Anatole France");
- **slot**: also, the answer names an object that the facts give the edit's relation, other than
  the edited object ("...French" for a mother-tongue edit; the relation's objects are those of
  the judge's pair builder, :class:`contraq.judge.pairs.PairBuilder`, over both data files).
  Precise, but it misses objects the data never names for the relation (a birthplace answered
  with a country).

    python scripts/strict_counts.py docs/results/cf-t12-160/eval-v9 \\
        [--hand docs/results/cf-t12-160/hand_labels.jsonl]

Prints, per method, each rate with its 95% bootstrap interval over facts and, with ``--hand``,
how many hand-labelled real and false counted questions each reading keeps.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from contraq.evaluation.reuse import read_eval_folder
from contraq.evaluation.stats import bootstrap_rate, per_fact_counts
from contraq.genuine import names_subject, normalize_text
from contraq.judge.facts import FactRow, read_fact_rows, same_answer
from contraq.judge.pairs import PairBuilder

DATA = ("data/counterfact_1000.jsonl", "data/zsre_1000.jsonl")


class Slots:
    """The objects the facts give each edit's relation, keyed by edit fact text."""

    def __init__(self) -> None:
        rows = [r for path in DATA for r in read_fact_rows(path)]
        builder = PairBuilder(rows)
        row_of: dict[tuple[str, str], FactRow] = {}
        for r in rows:
            row_of.setdefault((r.subject, r.prompt), r)
        self.by_edit: dict[str, tuple[str, list[str]]] = {}
        for path in DATA:
            for line in Path(path).read_text().splitlines():
                fact = json.loads(line)
                if fact.get("edited_answer") is None:
                    continue
                row = row_of[(fact["subject"], fact["prompt"])]
                objects = sorted({o for _, o in builder.objects[builder.rel[id(row)]]})
                self.by_edit.setdefault(fact["edit_fact"], (row.edited, objects))

    def hit(self, edit_fact: str, answer: str) -> bool:
        edited, objects = self.by_edit[edit_fact]
        text = f" {normalize_text(answer)} "
        return any(f" {normalize_text(o)} " in text and not same_answer(o, edited) for o in objects)


def readings(rec: dict, slots: Slots) -> dict[str, bool]:
    counted = bool(rec.get("genuine"))
    subject = counted and names_subject(str(rec["question"]), str(rec["subject"]))
    slot = subject and slots.hit(str(rec["edit_fact"]), str(rec.get("answer") or ""))
    return {"counted": counted, "subject": subject, "slot": slot}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", help="an eval folder (questions.jsonl, eval.json)")
    ap.add_argument("--hand", help="hand labels (scripts/hand_labels.py's format)")
    args = ap.parse_args()
    slots = Slots()
    _, by_method = read_eval_folder(Path(args.folder), "folder")
    print("method | counted | + names the subject | + answer names another object of the relation")
    for method, recs in by_method.items():
        cells = []
        for key in ("counted", "subject", "slot"):
            flags = [readings(r, slots)[key] for r in recs]
            rate, low, high = bootstrap_rate(
                per_fact_counts([r["fact_index"] for r in recs], flags)
            )
            cells.append(f"{rate:.3f} [{low:.3f}, {high:.3f}]")
        print(f"{method} | " + " | ".join(cells))
    if args.hand:
        subjects = {r["fact_index"]: r["subject"] for recs in by_method.values() for r in recs}
        kept: Counter[tuple[str, str, bool]] = Counter()
        for line in Path(args.hand).read_text().splitlines():
            h = json.loads(line)
            rec = {**h, "genuine": 1.0, "subject": subjects[h["fact_index"]]}
            for key, ok in readings(rec, slots).items():
                kept[(h["method"], key, bool(h["real"]))] += ok
        for method in sorted({m for m, _, _ in kept}):
            parts = [
                f"{key}: real {kept[(method, key, True)]}, false {kept[(method, key, False)]}"
                for key in ("counted", "subject", "slot")
            ]
            print(f"hand labels, {method}: " + "; ".join(parts))


if __name__ == "__main__":
    main()
