"""Reproduces docs/EXPERIMENTS.md section 6's "checked against the logged steps" counts (one-off).

What the logged training steps of runs hold that a faster step could exploit: how many of a
step's questions are distinct (answering them once each would drop the repeats' rows), and how
many answers run past their first sentence (stopping there would shorten answering).

    python scripts/step_questions.py docs/results/cf-curve-s0 docs/results/cf-curve-s1

Reads each run's samples.jsonl (every ``callbacks.sample_writer.every_n_steps`` steps, all of a
step's questions).
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from pathlib import Path

from contraq.evaluation.questions import dedup_key
from contraq.files import iter_jsonl

# A sentence end followed by more text.
_SECOND_SENTENCE = re.compile(r"[.!?]\s+\S")


def main(runs: list[str]) -> None:
    steps: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for run in runs:
        for _, row in iter_jsonl(Path(run) / "samples.jsonl"):
            steps[(run, int(row["step"]))].append(row)
    rows = [r for step in steps.values() for r in step]
    distinct = [
        len({(r["edit_fact"], dedup_key(r["question"])) for r in s}) for s in steps.values()
    ]
    sizes = [len(s) for s in steps.values()]
    longer = sum(bool(_SECOND_SENTENCE.search(str(r.get("answer") or ""))) for r in rows)
    print(f"{len(steps)} logged steps of {len(runs)} run(s), {len(rows)} questions")
    print(
        f"distinct questions per step: {sum(distinct) / len(distinct):.1f} of "
        f"{sum(sizes) / len(sizes):.1f} (min {min(distinct)}, max {max(distinct)})"
    )
    print(f"answers with a second sentence: {longer} of {len(rows)}")


if __name__ == "__main__":
    main(sys.argv[1:])
