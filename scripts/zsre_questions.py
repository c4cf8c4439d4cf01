"""zsRE's crowd-written questions as a questions file for `contraq eval questions=FILE`.

``zsre_questions_800.jsonl`` (../shared/data, SOURCES.md) holds, per edit, zsRE's question about
the subject's relation, its paraphrase and the edit's new object, but no declarative edit fact.
This writes two rows per fact (the question, then the paraphrase), each with an edit fact built
from the question and the new object:

- "What/Which/Who is/was the R?" -> "The R is/was A." (about a quarter of the questions);
- any other question -> "Q A." (the question followed by its new answer, as some CounterFact
  edit facts read: "What sport does R.A. Dickey play? They play soccer").

    python scripts/zsre_questions.py [--src ../shared/data/zsre_questions_800.jsonl]
        [--first 32] --out FILE
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SRC = REPO.parent / "shared" / "data" / "zsre_questions_800.jsonl"
_THE_R = re.compile(r"^(?:What|Which|Who) (is|was) (the .+?)\s*\?$")


def qa_edit_fact(question: str, answer: str) -> str:
    """A declarative edit fact from a question and its new answer (rules in the docstring)."""
    q, a = " ".join(question.split()), " ".join(answer.split())
    m = _THE_R.match(q)
    if m:
        return f"{m.group(2)[0].upper()}{m.group(2)[1:]} {m.group(1)} {a}."
    return f"{q} {a}."


def question_rows(records: list[dict], first: int) -> list[dict]:
    """Two rows per record of the first ``first`` with an edited answer: the question and its
    paraphrase, each with the fact's fields."""
    rows = []
    for r in [r for r in records if r.get("edited_answer")][:first]:
        fact = {
            "id": r["id"],
            "subject": r["subject"],
            "edit_fact": qa_edit_fact(r["question"], r["edited_answer"]),
            "original_answer": r["original_answer"],
            "edited_answer": r["edited_answer"],
        }
        rows += [{**fact, "question": r["question"], "source": "question"}]
        rows += [{**fact, "question": r["rephrase"], "source": "rephrase"}]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", type=Path, default=DEFAULT_SRC)
    ap.add_argument("--first", type=int, default=32, help="facts to keep, in file order")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    with args.src.open() as f:
        records = [json.loads(line) for line in f if line.strip()]
    rows = question_rows(records, args.first)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} questions for {len(rows) // 2} facts to {args.out}")


if __name__ == "__main__":
    main()
