"""scripts/both_splits.py on hand-made eval folders: facts of the two splits stay apart though
their indices repeat, and runs whose baselines differ are refused."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "both_splits.py"
_spec = importlib.util.spec_from_file_location("both_splits", SCRIPT)
both_splits = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(both_splits)


def _folder(path: Path, trained: list[int], beam: list[int], answer: str = "It is B.") -> Path:
    """An eval folder with one question per fact and method; ``genuine`` as given."""
    path.mkdir(parents=True)
    rows = []
    for method, flags in (("trained", trained), ("beam", beam)):
        for fact, flag in enumerate(flags):
            rows.append(
                {
                    "method": method,
                    "fact_index": fact,
                    "edit_fact": f"Fact {fact} is A",
                    "question": f"What is fact {fact}?",
                    "answer": answer,
                    "log_pq": -5.0,
                    "length": 4,
                    "genuine": flag,
                }
            )
    (path / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "eval.json").write_text(json.dumps({"settings": {}}))
    return path


def _run(capsys: pytest.CaptureFixture[str], *pairs: tuple[Path, Path]) -> str:
    """The script's output; a refusal raises SystemExit with its one line."""
    argv = []
    for test, val in pairs:
        argv += ["--pair", str(test), str(val)]
    both_splits.main(argv)
    return capsys.readouterr().out


def _row(out: str, name: str) -> list[str]:
    line = next(x for x in out.splitlines() if x.startswith(f"| {name} "))
    return [c.strip() for c in line.strip("|").split("|")]


def test_union_keeps_the_splits_facts_apart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Test: trained 2/4, beam 0/4. Val (the same fact indices 0-3): trained 4/4, beam 1/4.
    test = _folder(tmp_path / "test", [1, 1, 0, 0], [0, 0, 0, 0])
    val = _folder(tmp_path / "val", [1, 1, 1, 1], [0, 1, 0, 0])
    out = _run(capsys, (test, val))
    assert "(8 facts x 1), genuine_rate" in out  # 4 + 4 facts, not 4
    trained = _row(out, str(test))
    assert trained[1].startswith("0.500 ") and trained[2].startswith("1.000 ")
    assert trained[3].startswith("0.750 ")
    assert trained[5].startswith("+0.625 ")  # 6/8 - 1/8, paired over the 8 facts
    assert _row(out, "beam")[3].startswith("0.125 ")


def test_runs_with_other_baselines_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = (_folder(tmp_path / "a/test", [1], [0]), _folder(tmp_path / "a/val", [1], [0]))
    b = (_folder(tmp_path / "b/test", [1], [0], "Other."), _folder(tmp_path / "b/val", [1], [0]))
    with pytest.raises(SystemExit, match="beam records differ"):
        _run(capsys, a, b)
    assert "every run pooled" in _run(capsys, a, a)


@pytest.mark.parametrize("missing", ["eval.json", "questions.jsonl"])
def test_a_folder_that_is_not_an_eval_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], missing: str
) -> None:
    test = _folder(tmp_path / "test", [1], [0])
    val = _folder(tmp_path / "val", [1], [0])
    (val / missing).unlink()
    with pytest.raises(SystemExit, match=re.escape(f"{val / missing} not found")):
        _run(capsys, (test, val))


def test_another_method_of_the_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    test = _folder(tmp_path / "test", [1, 0], [0, 0])
    val = _folder(tmp_path / "val", [1, 1], [0, 0])
    with pytest.raises(SystemExit, match="no trained_distinct records"):
        both_splits.main(["--pair", str(test), str(val), "--method", "trained_distinct"])
    capsys.readouterr()
    out = _run(capsys, (test, val))
    assert "| trained (4 facts x 1), genuine_rate |" in out


def test_distinct_counted_questions_per_fact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Two counted questions of fact 0 with one wording: one distinct counted question there.
    test = _folder(tmp_path / "test", [1, 1], [0, 1])
    path = test / "questions.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    rows[1]["fact_index"] = 0  # trained's second question joins fact 0, in the same wording
    rows[1]["question"] = rows[0]["question"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    val = _folder(tmp_path / "val", [1], [0])
    both_splits.main(["--pair", str(test), str(val), "--key", "counted_distinct"])
    out = capsys.readouterr().out
    trained = _row(out, str(test))
    # Test: fact 0 has 1 distinct counted (fact 1 only has beam's row); val: 1. Mean 1.0.
    assert trained[1].startswith("1.000 ") and trained[3].startswith("1.000 ")
    assert _row(out, "beam")[3].startswith("0.333 ")  # 0, 1 on test; 0 on val
    assert "every run pooled" not in out
