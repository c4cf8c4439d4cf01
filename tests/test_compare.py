"""`contraq compare` on hand-made eval folders: paired and pooled differences, the set per fact,
both splits (facts of the two splits stay apart though their indices repeat; runs whose
baselines differ are refused), hand-label precision, and one-line refusals of bad input."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from contraq.cli import main
from contraq.config.checks import ConfigError
from contraq.evaluation.compare import (
    CompareConfig,
    compare_labels,
    compare_paired,
    compare_splits,
    wilson,
)


def _rows(method: str, flags: list[int], answer: str, questions: list[str] | None = None) -> list:
    return [
        {
            "method": method,
            "fact_index": fact,
            "edit_fact": f"Fact {fact} is A",
            "question": questions[fact] if questions else f"What is fact {fact}?",
            "answer": answer,
            "log_pq": -5.0,
            "length": 4,
            "genuine": flag,
        }
        for fact, flag in enumerate(flags)
    ]


def _folder(
    path: Path,
    trained: list[int],
    beam: list[int],
    answer: str = "It is B.",
    summary: dict[str, Any] | None = None,
) -> Path:
    """An eval folder with one question per fact and method; ``genuine`` as given."""
    path.mkdir(parents=True)
    rows = _rows("trained", trained, answer) + _rows("beam", beam, answer)
    (path / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "eval.json").write_text(json.dumps({"settings": {}, "summary": summary or {}}))
    return path


def _cfg(**kw: Any) -> CompareConfig:
    return CompareConfig(**kw)


def _cells(out: str, name: str) -> list[str]:
    line = next(x for x in out.splitlines() if x.startswith(f"| {name} "))
    return [c.strip() for c in line.strip("|").split("|")]


def _line(out: str, start: str) -> str:
    return next(x for x in out.splitlines() if x.startswith(start))


# ---------------------------------------------------------------------------- paired


def test_paired_difference_of_two_folders_and_of_another_method(tmp_path: Path) -> None:
    a = _folder(tmp_path / "a", [1, 1, 1, 0], [0, 0, 0, 0])
    b = _folder(tmp_path / "b", [1, 0, 0, 0], [1, 1, 0, 0])
    out = compare_paired(_cfg(mode="paired", a=str(a), b=str(b)))
    assert _line(out, "genuine_rate: A 0.750 ").endswith("vs B 0.250 [0.000, 0.750]")
    assert _line(out, "genuine_rate: A - B = +0.500 ")
    out = compare_paired(_cfg(mode="paired", a=str(a), b=f"{b}@beam"))
    assert _line(out, "genuine_rate: A - B = +0.250 ") and f"B: {b}@beam" in out


def test_a_list_is_pooled(tmp_path: Path) -> None:
    a = _folder(tmp_path / "a", [1, 1, 0, 0], [0, 0, 0, 0])
    b = _folder(tmp_path / "b", [1, 1, 1, 1], [0, 0, 0, 0])
    out = compare_paired(_cfg(mode="paired", a=[str(a), str(b)], b=f"{a}@beam"))
    # 6 of 8 pooled questions against 0 of 4: every fact resampled keeps A above B.
    assert _line(out, "genuine_rate: A 0.750 ") and "(2 pooled)" in out
    assert _line(out, "genuine_rate: A - B = +0.750 ").endswith("(P(diff<=0) 0.000)")


def test_the_set_per_fact_at_a_budget(tmp_path: Path, embedder) -> None:
    # A: two distinct counted questions per fact (other meanings); B: the same one twice.
    qa = ["Where was she born?", "What sport does she play?"]
    rows_a = [r for q in qa for r in _rows("trained", [1, 1], "B.", [q, q])]
    rows_b = [r for _ in qa for r in _rows("trained", [1, 1], "B.", [qa[0], qa[0]])]
    for name, rows in (("a", rows_a), ("b", rows_b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "questions.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows)
        )
        (tmp_path / name / "eval.json").write_text("{}")
    cfg = _cfg(mode="paired", a=str(tmp_path / "a"), b=str(tmp_path / "b"), budget=2)
    out = compare_paired(cfg, embedder.encode)
    assert _line(out, "distinct  A - B +1.00 [+1.00, +1.00]  A / B 2.00x [2.00, 2.00]")
    assert "the set per fact at 2 questions" in out


@pytest.mark.parametrize("missing", ["eval.json", "questions.jsonl"])
def test_a_folder_that_is_not_an_eval_is_named(tmp_path: Path, missing: str) -> None:
    a = _folder(tmp_path / "a", [1], [0])
    b = _folder(tmp_path / "b", [1], [0])
    (b / missing).unlink()
    with pytest.raises(ConfigError, match=re.escape(f"b: {b / missing} not found")):
        compare_paired(_cfg(mode="paired", a=str(a), b=str(b)))


def test_a_missing_method_and_other_facts_are_refused(tmp_path: Path) -> None:
    a = _folder(tmp_path / "a", [1, 0], [0, 0])
    b = _folder(tmp_path / "b", [1, 0, 1], [0, 0, 0])
    with pytest.raises(ConfigError, match=f"a: {re.escape(str(a))} has no trained_distinct"):
        compare_paired(_cfg(mode="paired", a=str(a), b=str(a), method="trained_distinct"))
    with pytest.raises(ConfigError, match="b: .* holds other facts than .* 1 only in B"):
        compare_paired(_cfg(mode="paired", a=str(a), b=str(b)))


def test_the_command_prints_one_line_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = _folder(tmp_path / "a", [1, 0], [0, 0])
    assert main(["compare", "mode=paired", f"a={a}", f"b={a}@beam"]) == 0
    assert "genuine_rate: A - B = +0.500 " in capsys.readouterr().out
    for args, says in (
        ([f"a={a}", f"b={tmp_path}"], f"b: {tmp_path / 'eval.json'} not found"),
        ([f"a={a}", f"b={a}", "method=nope"], f"a: {a} has no nope records"),
        ([f"a={a}"], "b: missing; mode=paired needs b=..."),
        ([f"a={a}", f"b={a}", "+methd=beam"], "methd: no part of contraq reads this key"),
    ):
        assert main(["compare", "mode=paired", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"contraq compare: {says}") and "\n" not in err
    assert main(["compare", "mode=pairs"]) == 2
    assert "mode: must be one of paired, splits, labels" in capsys.readouterr().err


# ---------------------------------------------------------------------------- splits


def _splits(*pairs: tuple[Path, Path], **kw: Any) -> str:
    tests, vals = [str(t) for t, _ in pairs], [str(v) for _, v in pairs]
    return compare_splits(_cfg(mode="splits", test=tests, val=vals, **kw))


def test_union_keeps_the_splits_facts_apart(tmp_path: Path) -> None:
    # Test: trained 2/4, beam 0/4. Val (the same fact indices 0-3): trained 4/4, beam 1/4.
    test = _folder(tmp_path / "test", [1, 1, 0, 0], [0, 0, 0, 0])
    val = _folder(tmp_path / "val", [1, 1, 1, 1], [0, 1, 0, 0])
    out = _splits((test, val))
    assert "(8 facts x 1), genuine_rate" in out  # 4 + 4 facts, not 4
    trained = _cells(out, str(test))
    assert trained[1].startswith("0.500 ") and trained[2].startswith("1.000 ")
    assert trained[3].startswith("0.750 ")
    assert trained[5].startswith("+0.625 ")  # 6/8 - 1/8, paired over the 8 facts
    assert _cells(out, "beam")[3].startswith("0.125 ")


def test_runs_with_other_baselines_are_refused(tmp_path: Path) -> None:
    a = (_folder(tmp_path / "a/test", [1], [0]), _folder(tmp_path / "a/val", [1], [0]))
    b = (_folder(tmp_path / "b/test", [1], [0], "Other."), _folder(tmp_path / "b/val", [1], [0]))
    with pytest.raises(ConfigError, match="beam records differ"):
        _splits(a, b)
    assert "every run pooled" in _splits(a, a)
    with pytest.raises(ConfigError, match=r"val: needs one folder per test folder \(2\), got 1"):
        compare_splits(_cfg(mode="splits", test=[str(a[0]), str(b[0])], val=str(a[1])))


def test_another_method_of_the_runs(tmp_path: Path) -> None:
    test = _folder(tmp_path / "test", [1, 0], [0, 0])
    val = _folder(tmp_path / "val", [1, 1], [0, 0])
    with pytest.raises(ConfigError, match="method: .* no trained_distinct records"):
        _splits((test, val), method="trained_distinct")
    assert "| trained (4 facts x 1), genuine_rate |" in _splits((test, val))


def test_distinct_counted_questions_per_fact(tmp_path: Path) -> None:
    # Two counted questions of fact 0 with one wording: one distinct counted question there.
    test = _folder(tmp_path / "test", [1, 1], [0, 1])
    path = test / "questions.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    rows[1]["fact_index"] = 0  # trained's second question joins fact 0, in the same wording
    rows[1]["question"] = rows[0]["question"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    val = _folder(tmp_path / "val", [1], [0])
    out = _splits((test, val), key="counted_distinct")
    trained = _cells(out, str(test))
    # Test: fact 0 has 1 distinct counted (fact 1 only has beam's row); val: 1. Mean 1.0.
    assert trained[1].startswith("1.000 ") and trained[3].startswith("1.000 ")
    assert _cells(out, "beam")[3].startswith("0.333 ")  # 0, 1 on test; 0 on val
    assert "every run pooled" not in out


# ---------------------------------------------------------------------------- labels


def test_wilson_interval_is_the_textbook_formula() -> None:
    z = 1.959964
    for k, n in ((16, 20), (0, 5), (25, 25), (13, 20)):
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        low, high = wilson(k, n)
        assert abs(low - (centre - half)) < 1e-6 and abs(high - (centre + half)) < 1e-6


def test_hand_label_precision_per_method(tmp_path: Path) -> None:
    records = _folder(
        tmp_path / "eval",
        [1],
        [0],
        summary={m: {"genuine_rate": r} for m, r in (("trained", 0.4), ("beam", 0.2))},
    )
    labels = tmp_path / "labels.jsonl"
    rows = [{"method": "trained", "real": i < 16} for i in range(20)]
    rows += [{"method": "beam", "real": i < 2} for i in range(10)]
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = compare_labels(_cfg(mode="labels", labels=str(labels), records=str(records)))
    assert "| trained | 16 / 20 | 0.80 [0.58, 0.92] | 0.400 | 0.320 |" in out
    assert "| beam | 2 / 10 | 0.20 [0.06, 0.51] | 0.200 | 0.040 |" in out
    # Hypergeometric: 2 or fewer of 18 real among 10 beam labels of 30, both tails: 0.0041.
    assert "Fisher's exact test, two-sided: P = 0.004" in out
    labels.write_text(json.dumps({"method": "untrained", "real": True}) + "\n{}\n")
    with pytest.raises(ConfigError, match=re.escape(f"labels: {labels}:2: no method, real")):
        compare_labels(_cfg(mode="labels", labels=str(labels), records=str(records)))
    labels.write_text(json.dumps({"method": "untrained", "real": True}) + "\n")
    with pytest.raises(ConfigError, match="records: .*eval.json has no method untrained"):
        compare_labels(_cfg(mode="labels", labels=str(labels), records=str(records)))
