"""Records committed under docs/results are gzipped (questions.jsonl.gz, samples.jsonl.gz): every
reader takes the plain file when present, else its ``.gz``."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from conftest import save_tiny_nli
from contraq.cli import main
from contraq.evaluation.report import write_report
from contraq.evaluation.reuse import read_eval_folder
from contraq.files import REPO_ROOT, iter_jsonl, jsonl_or_gz

RESULTS = REPO_ROOT / "docs" / "results"


def gzip_file(plain: Path) -> Path:
    """``plain`` -> ``plain.gz`` (the plain file removed), as docs/results keeps records."""
    packed = plain.with_name(plain.name + ".gz")
    with plain.open("rb") as src, gzip.open(packed, "wb", compresslevel=9) as dst:
        shutil.copyfileobj(src, dst)
    plain.unlink()
    return packed


def test_iter_jsonl_reads_the_gz_when_the_plain_file_is_absent(tmp_path: Path) -> None:
    rows = [{"a": 1}, {"b": "é"}]
    plain = tmp_path / "x.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n", encoding="utf-8")
    packed = gzip_file(plain)
    assert jsonl_or_gz(plain) == packed
    assert [obj for _, obj in iter_jsonl(plain)] == rows
    # The plain file wins when both exist (a fresh eval writes it beside an old .gz).
    plain.write_text('{"c": 3}\n')
    assert jsonl_or_gz(plain) == plain
    assert [obj for _, obj in iter_jsonl(plain)] == [{"c": 3}]
    # A bad line in the .gz is named by the file that holds it and its line.
    plain.unlink()
    with gzip.open(packed, "wt") as fh:
        fh.write('{"a": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"x\.jsonl\.gz:2: not valid JSON"):
        list(iter_jsonl(plain))
    # Neither file: the plain name is the one reported missing.
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        list(iter_jsonl(tmp_path / "nothing.jsonl"))


@pytest.mark.parametrize("folder", ["cf-t12-160-s1/val-v9", "demo-fast/eval89-v9"])
def test_committed_gzipped_records_load_as_baselines(folder: str) -> None:
    """The kept folders hold only questions.jsonl.gz; `baselines_from` and the analysis scripts
    read them through read_eval_folder, every method with eval.json's count of questions."""
    path = RESULTS / folder
    assert not (path / "questions.jsonl").exists() and (path / "questions.jsonl.gz").is_file()
    result, by_method = read_eval_folder(path, "baselines_from")
    assert set(by_method) == set(result["summary"])
    for method, recs in by_method.items():
        assert len(recs) == result["summary"][method]["n_questions"], method


def test_rescore_reads_a_gzipped_eval_folder(tmp_path: Path) -> None:
    """`contraq rescore` on a committed eval folder whose questions.jsonl was gzipped (the first
    3 facts of demo-v2's eval, judged again by a tiny judge: the mechanics, not the numbers)."""
    src = RESULTS / "demo-v2" / "eval"
    records = tmp_path / "records"
    records.mkdir()
    shutil.copy(src / "eval.json", records / "eval.json")
    kept = [rec for _, rec in iter_jsonl(src / "questions.jsonl") if rec["fact_index"] < 3]
    plain = records / "questions.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in kept))
    gzip_file(plain)
    judge = save_tiny_nli(tmp_path / "judge")
    out = tmp_path / "rescored"
    argv = [f"records={records}", f"judge={judge}", f"out={out}", f"run={src.parent}"]
    assert main(["rescore", *argv]) == 0
    again = [rec for _, rec in iter_jsonl(out / "questions.jsonl")]
    assert [(r["method"], r["question"], r["answer"]) for r in again] == [
        (r["method"], r["question"], r["answer"]) for r in kept
    ]
    summary = json.loads((out / "eval.json").read_text())["summary"]
    assert {m: s["n_questions"] for m, s in summary.items()} == {
        m: sum(r["method"] == m for r in kept) for m in summary
    }


def test_report_reads_gzipped_samples(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: run\nseed: 0\n")
    row = {"step": 0, "subject": "A", "edit_fact": "A is B", "question": "Who made A?"}
    (run / "samples.jsonl").write_text(json.dumps({**row, "answer": "C", "log_r": -1.0}) + "\n")
    gzip_file(run / "samples.jsonl")
    text = write_report(run).read_text()
    assert "Who made A?" in text
