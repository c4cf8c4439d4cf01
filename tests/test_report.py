"""`contraq report` on a synthetic run folder: curves, report.md and its numbers."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from contraq.cli import main
from contraq.evaluation.plots import (
    PANELS,
    plot_rate_vs_diversity,
    plot_reward_distributions,
    plot_reward_vs_diversity,
    smooth,
)
from contraq.evaluation.report import (
    ReportError,
    eval_markdown,
    read_metrics,
    top_questions,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics_csv(path: Path, n_steps: int = 30) -> None:
    """Like Lightning's CSVLogger: sorted header, one row per log call, empty cells elsewhere."""
    keys = [
        "lr-AdamW",
        "step",
        "train/contradiction_rate",
        "train/distinct_2",
        "train/length",
        "train/log_c",
        "train/log_pq",
        "train/log_r",
        "train/log_z",
        "train/loss",
        "train/reward_temperature",
        "val/log_r",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for s in range(n_steps):
            w.writerow({"step": s, "lr-AdamW": 1e-4})  # a separate row, as LearningRateMonitor
            w.writerow(
                {
                    "step": s,
                    "train/loss": 10.0 / (s + 1),
                    "train/log_r": -5.0 + 0.1 * s,
                    "train/log_c": -2.0 + 0.05 * s,
                    "train/contradiction_rate": s / n_steps,
                    "train/log_pq": -30.0 + s,
                    "train/length": 10 + s % 3,
                    "train/distinct_2": 0.9,
                    "train/reward_temperature": 1.0 - 0.5 * s / n_steps,
                    "train/log_z": 0.1 * s,
                }
            )
            if s % 10 == 9:
                w.writerow({"step": s, "val/log_r": -4.0 + s})


def write_samples(path: Path) -> None:
    rows = [
        # fact A: the same question twice (best row must win), and two others
        ("A", "A was made by X", "Who made A?", -3.0),
        ("A", "A was made by X", "Who made A?", -1.0),
        ("A", "A was made by X", "What is A?", -2.0),
        ("A", "A was made by X", "Where is A | B?", -7.5),
        ("B", "B is in Y", "Where is B?", -0.5),
    ]
    with path.open("w") as fh:
        for i, (subj, fact, q, r) in enumerate(rows):
            rec = {
                "step": i * 5,
                "subject": subj,
                "edit_fact": fact,
                "question": q,
                "answer": f"answer {i}",
                "log_r": r,
                "log_c": r / 2,
                "log_pq": r * 3,
            }
            fh.write(json.dumps(rec) + "\n")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    write_metrics_csv(run / "logs" / "metrics.csv")
    write_samples(run / "samples.jsonl")
    (run / "config.yaml").write_text(
        "name: run\nseed: 0\nmodel:\n  source: tiny\nreward:\n  name: contradiction\n"
        "train:\n  max_steps: 30\n  lr: 0.0005\n"
    )
    (run / "train_summary.json").write_text(json.dumps({"steps": 30, "seconds": 123.4}))
    return run


def test_read_metrics_merges_rows_by_step(run_dir: Path) -> None:
    m = read_metrics(run_dir / "logs" / "metrics.csv")
    assert m["train/loss"][0] == (0, 10.0)
    assert len(m["train/loss"]) == 30
    assert m["val/log_r"] == [(9, 5.0), (19, 15.0), (29, 25.0)]
    assert len(m["lr-AdamW"]) == 30
    assert "step" not in m


def test_read_metrics_errors_name_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "metrics.csv"
    p.write_text("a,b\n1,2\n")
    with pytest.raises(ReportError, match="metrics.csv:1"):
        read_metrics(p)
    p.write_text("step,train/loss\n0,1.0\nxx,2.0\n")
    with pytest.raises(ReportError, match="metrics.csv:3: step"):
        read_metrics(p)


def test_smooth() -> None:
    assert smooth([1.0, 2.0, 3.0], 0.0) == [1.0, 2.0, 3.0]
    # Bias-corrected EMA: a constant series stays constant from the first point.
    assert smooth([4.0] * 5, 0.9) == pytest.approx([4.0] * 5)
    s = smooth([0.0, 10.0], 0.5)
    assert s[0] == 0.0 and s[1] == pytest.approx((0.5 * 0 * 0.5 + 0.5 * 10) / 0.75)
    with pytest.raises(ValueError):
        smooth([1.0], 1.0)


def test_top_questions_dedups_and_ranks() -> None:
    rows = [json.loads(x) for x in []]
    assert top_questions(rows) == []
    samples = [
        {"subject": "A", "edit_fact": "f", "question": "q1", "log_r": -3.0, "step": 0},
        {"subject": "A", "edit_fact": "f", "question": "q1", "log_r": -1.0, "step": 5},
        {"subject": "A", "edit_fact": "f", "question": "q2", "log_r": -2.0, "step": 5},
    ]
    ((subj, fact, best),) = top_questions(samples, per_fact=5)
    assert (subj, fact) == ("A", "f")
    assert [(r["question"], r["log_r"], r["step"]) for r in best] == [
        ("q1", -1.0, 5),
        ("q2", -2.0, 5),
    ]


def test_write_report(run_dir: Path) -> None:
    path = write_report(run_dir)
    assert path == run_dir / "report" / "report.md"
    text = path.read_text()
    # Every panel with data got a PNG, linked from the Markdown.
    expected = {
        "loss.png",
        "log_r.png",
        "log_c.png",
        "contradiction_rate.png",
        "log_pq.png",
        "length.png",
        "diversity.png",
        "reward_temperature.png",
        "log_z.png",
    }
    assert expected <= {p.file for p in PANELS}
    for name in expected:
        png = run_dir / "report" / name
        assert png.read_bytes()[:8] == PNG_MAGIC, name
        assert f"]({name})" in text
    # Run facts and final numbers.
    assert "- steps: 30" in text and "- wall time: 123 s" in text
    assert "| train/loss | 29 | 0.3333 |" in text  # last value 10/30
    mean_last10 = sum(-5.0 + 0.1 * s for s in range(20, 30)) / 10
    assert f"| train/log_r | 29 | {-5.0 + 2.9:.4g} | {mean_last10:.4g} |" in text
    assert "| val/log_r | 29 | 25 | 15 |" in text
    assert "| model.source | tiny |" in text
    # Top questions: fact A's best copy of "Who made A?" first, the pipe escaped.
    a = text.index("**A**")
    assert text.index("Who made A?", a) < text.index("What is A?", a)
    assert "| 5 | Who made A? | answer 1 | -0.50 | -3.00 | -1.00 |" in text
    assert "Where is A \\| B?" in text
    assert "**B**" in text
    assert "eval.md" not in text  # no eval yet


def test_report_links_eval(run_dir: Path) -> None:
    (run_dir / "eval").mkdir()
    summary = {
        "trained": {
            "n_questions": 16.0,
            "genuine_rate": 0.125,
            "genuine_rate_low": 0.05,
            "genuine_rate_high": 0.2,
            "contradiction_rate": 0.25,
            "mean_log_r": -3.0,
        }
    }
    (run_dir / "eval" / "eval.json").write_text(json.dumps({"summary": summary}))
    (run_dir / "eval" / "eval.md").write_text("# eval\n")
    text = write_report(run_dir).read_text()
    assert "[eval.md](../eval/eval.md)" in text
    assert "| trained | 16 | 0.125 [0.050, 0.200] | n/a | 0.250 |" in text


def test_report_command(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", f"run={run_dir}", f"out={tmp_path / 'r'}", "smoothing=0.5"]) == 0
    assert (tmp_path / "r" / "report.md").is_file()
    assert main(["report", f"run={tmp_path / 'nope'}"]) == 2
    assert "run folder not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", f"run={tmp_path / 'empty'}"]) == 2
    assert "not a run folder" in capsys.readouterr().err
    # Bad settings: one line each, exit 2.
    for argv, says in (
        ([], "run: missing"),
        ([f"run={run_dir}", "smoothing=1.5"], "smoothing: must lie in [0, 1)"),
        ([f"run={run_dir}", "smothing=0.5"], "Could not override 'smothing'"),
    ):
        assert main(["report", *argv]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err
    assert main(["report", "--help"]) == 0
    assert "smoothing:" in capsys.readouterr().out


def test_eval_plots_and_markdown(tmp_path: Path) -> None:
    log_r = {"trained": [-1.0, -2.0, -1.5], "beam": [-3.0, -math.inf, -3.5]}
    p1 = plot_reward_distributions(log_r, tmp_path / "d.png")
    summary = {
        "trained": {"diversity": 0.4, "mean_log_r": -1.5, "n_questions": 3.0},
        "beam": {"diversity": 0.1, "mean_log_r": math.nan, "n_questions": 3.0},
    }
    p2 = plot_reward_vs_diversity(summary, tmp_path / "s.png")
    assert p1.read_bytes()[:8] == PNG_MAGIC and p2.read_bytes()[:8] == PNG_MAGIC
    summary["trained"].update(genuine_rate=0.5, genuine_rate_low=0.3, genuine_rate_high=0.7)
    summary["beam"].update(genuine_rate=0.1, genuine_rate_low=0.0, genuine_rate_high=0.2)
    p3 = plot_rate_vs_diversity(summary, ["beam"], tmp_path / "f.png")
    assert p3.read_bytes()[:8] == PNG_MAGIC
    md = eval_markdown(
        {
            "settings": {"n": 3, "notes": ["plain beam"]},
            "summary": summary,
            "comparisons": {"beam": {"diff": 0.4, "low": 0.2, "high": 0.6, "p_le_0": 0.0}},
            "frontier": {"diversity": 0.4, "trained_rate": 0.5, "frontier_rate": 0.1},
        },
        {"Reward": "d.png"},
    )
    na6 = " | ".join(["n/a"] * 6)  # coverage, raw, question, echo, names original, log C
    assert f"| trained | 3 | 0.500 [0.300, 0.700] | {na6} | -1.50 |" in md
    assert f"| beam | 3 | 0.100 [0.000, 0.200] | {na6} | n/a |" in md
    assert "| beam | 0.400 | [0.200, 0.600] | 0.0000 |" in md
    assert "at the trained policy's diversity 0.400: 0.100; trained: 0.500." in md
    assert "![Reward](d.png)" in md and "note: plain beam" in md


def test_report_on_a_damaged_metrics_file_says_which_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 28: a metrics.csv that is not UTF-8 ended `contraq report` with a traceback."""
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    metrics = run / "logs" / "metrics.csv"
    for data, says in (
        (b"step,loss\n0,1\n\xff\xfe1,2\n", "metrics.csv:3: not UTF-8 text (byte 0xff)"),
        (b"", "metrics.csv:1: empty file"),
        (b"step,loss\n0,1\n1," + b"9" * 200_000 + b"\n", "metrics.csv:3: not CSV"),
    ):
        metrics.write_bytes(data)
        assert main(["report", f"run={run}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("contraq report: ") and says in err and err.count("\n") == 1, err
    # Cut off mid-row (a kill while CSVLogger wrote): the rows before it are reported.
    metrics.write_bytes(b"step,train/loss\n0,1.5\n1,0.")
    assert main(["report", f"run={run}"]) == 0
    assert read_metrics(metrics)["train/loss"] == [(0, 1.5), (1, 0.0)]
    (run / "samples.jsonl").write_bytes(b'{"step": 0}\n\xff\n')
    assert main(["report", f"run={run}"]) == 2
    err = capsys.readouterr().err
    assert "samples.jsonl: not UTF-8 text" in err and err.count("\n") == 1, err
