"""`contraq report`: the Markdown of a run (``report.md``, its curves drawn by
:mod:`contraq.evaluation.plots`) and the tables of `contraq eval` (``eval.md``).

Reads only files of the run folder (``logs/metrics.csv``, ``samples.jsonl``, ``config.yaml``,
``train_summary.json``, ``eval/eval.json``): no model is loaded, so a report is instant and can
be written on any machine.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from contraq.config.checks import ConfigError
from contraq.config.settings import typed
from contraq.errors import UserError
from contraq.evaluation.plots import Series, plot_curves
from contraq.files import iter_jsonl, jsonl_or_gz


class ReportError(UserError, ValueError):
    """A run folder or one of its files is missing or malformed (the message names it)."""


# --------------------------------------------------------------------------- reading


def read_metrics(path: str | Path) -> dict[str, Series]:
    """Columns of a Lightning CSVLogger ``metrics.csv`` as ``{name: [(step, value), ...]}``.

    CSVLogger writes one row per ``log_metrics`` call with empty cells for the other columns;
    empty and non-numeric cells are skipped. When a step appears twice for a column (a resumed
    run re-logs it) the later row wins. Series are sorted by step.
    """
    p = Path(path)
    if not p.is_file():
        raise ReportError(f"{p}: metrics file not found")
    reader = csv.DictReader(io.StringIO(_utf8_text(p), newline=""))
    try:
        if not reader.fieldnames or "step" not in reader.fieldnames:
            what = "empty file" if not reader.fieldnames else "header has no 'step' column"
            raise ReportError(f"{p}:1: {what} (not a CSVLogger metrics.csv?)")
        return _metric_series(p, reader)
    except csv.Error as e:  # a field over csv's size limit (line_num: the lines before it)
        raise ReportError(f"{p}:{reader.line_num + 1}: not CSV ({e})") from None


def _utf8_text(p: Path) -> str:
    """The file's text; one that is not UTF-8 (CSVLogger writes UTF-8) names its line."""
    data = p.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ReportError(f"{p}:{line}: not UTF-8 text (byte {data[e.start]:#04x})") from None


def _metric_series(p: Path, reader: csv.DictReader[str]) -> dict[str, Series]:
    """:func:`read_metrics`' columns from its reader (positioned after the header)."""
    table: dict[str, dict[int, float]] = {}
    for line, row in enumerate(reader, start=2):
        raw_step = row.get("step") or ""
        try:
            step = int(float(raw_step))
        except ValueError:
            raise ReportError(f"{p}:{line}: step: not a number ({raw_step!r})") from None
        for key, cell in row.items():
            if key in (None, "step") or cell in (None, ""):
                continue
            try:
                value = float(cell)
            except ValueError:
                continue
            table.setdefault(key, {})[step] = value
    return {k: sorted(v.items()) for k, v in sorted(table.items())}


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Objects of a JSON Lines file; blank lines skipped; bad lines raise naming file:line."""
    try:
        return [obj for _, obj in iter_jsonl(path)]
    except UnicodeDecodeError as exc:  # a ValueError that names no file
        raise ReportError(f"{jsonl_or_gz(path)}: not UTF-8 text ({exc.reason})") from None
    except ValueError as exc:
        raise ReportError(str(exc)) from None


# --------------------------------------------------------------------------- Markdown

EVAL_COLUMNS: tuple[tuple[str, str, str], ...] = (
    # key, header, format; keys with <key>_low/_high are shown with their 95% interval
    ("n_questions", "n", "{:.0f}"),
    ("genuine_rate", "counted rate [95% CI]", "{:.3f}"),
    ("coverage", "facts covered [95% CI]", "{:.3f}"),
    ("contradiction_rate", "raw judge rate", "{:.3f}"),
    ("question_rate", "question rate", "{:.3f}"),
    ("echo_rate", "echo rate", "{:.3f}"),
    ("independent_rate", "names original [95% CI]", "{:.3f}"),
    ("mean_log_c", "mean log C", "{:.3f}"),
    ("mean_log_r", "mean log R", "{:.2f}"),
    ("diversity", "diversity", "{:.3f}"),
    ("counted_distinct", "distinct counted / fact", "{:.2f}"),
    ("counted_diversity", "diversity of counted", "{:.3f}"),
    ("distinct_1", "distinct-1", "{:.3f}"),
    ("distinct_2", "distinct-2", "{:.3f}"),
    ("mean_length", "mean length", "{:.1f}"),
    ("fluency", "log P_Q / token", "{:.2f}"),
)


def fmt(value: Any, pattern: str = "{:.3f}") -> str:
    """A number for a table cell; "n/a" for None/NaN, "-inf"/"inf" for infinities."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
    if isinstance(value, int | float):
        return pattern.format(value)
    return str(value)


def md_cell(text: Any) -> str:
    """Text safe inside a Markdown table cell (pipes escaped, newlines as spaces)."""
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (cells escaped with :func:`md_cell`)."""
    lines = ["| " + " | ".join(md_cell(h) for h in headers) + " |"]
    lines.append("|" + "|".join("---" for _ in headers) + "|")
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_ci(m: Mapping[str, Any], key: str, pattern: str = "{:.3f}") -> str:
    """``m[key]`` with its interval ``[m[key_low], m[key_high]]`` when ``m`` has one."""
    low, high = m.get(f"{key}_low"), m.get(f"{key}_high")
    if low is None or high is None:
        return fmt(m.get(key), pattern)
    return f"{fmt(m.get(key), pattern)} [{fmt(low, pattern)}, {fmt(high, pattern)}]"


def eval_table(summary: Mapping[str, Mapping[str, float]]) -> str:
    """The per-method metrics table of `contraq eval`."""
    headers = ["method", *(h for _, h, _ in EVAL_COLUMNS)]
    rows = [[name, *(fmt_ci(m, k, f) for k, _, f in EVAL_COLUMNS)] for name, m in summary.items()]
    return markdown_table(headers, rows)


def eval_markdown(result: Mapping[str, Any], plots: Mapping[str, str]) -> str:
    """``eval.md``: settings, the metrics table, plots, example questions per method.

    Args:
        result: the ``eval.json`` object (``settings``, ``summary``, ``examples``).
        plots: caption -> PNG path relative to the Markdown file.
    """
    s = result.get("settings", {})
    lines = [
        "# contraq eval",
        "",
        f"- run: `{s.get('run', 'n/a')}`",
        f"- facts: {s.get('n_facts', 'n/a')} from `{s.get('facts', 'n/a')}`",
        f"- questions per fact and method: {s.get('n', 'n/a')}; seed {s.get('seed', 'n/a')}",
        f"- device: {s.get('device', 'n/a')}; wall time {fmt(s.get('seconds'), '{:.0f}')} s",
        f"- judge: `{s.get('judge', 'n/a')}`",
    ]
    for note in s.get("notes", []):
        lines.append(f"- note: {note}")
    lines += [
        "",
        "Counted rate: share of texts that are questions (one sentence, interrogative form), "
        "whose answer is not an echo (it adds a content word beyond the edit fact and the "
        "question, and the question itself is not judged a contradiction) and is judged a "
        "contradiction (P > 0.5). Raw judge rate: P(contradiction) > 0.5 alone. Names original: "
        "a question whose answer names the original (pre-edit) object while the question does "
        "not (word match, independent of the judge). Intervals: 95% bootstrap over facts. "
        "Diversity: 1 - mean pairwise cosine of MiniLM embeddings within a fact, averaged over "
        "facts.",
        "",
        eval_table(result.get("summary", {})),
        "",
    ]
    lines += _comparison_lines(result)
    lines += yield_lines(result.get("yield"))
    for caption, rel in plots.items():
        lines += [f"![{caption}]({rel})", ""]
    examples = result.get("examples", {})
    if examples:
        lines += ["## Random question/answer pairs per method", ""]
        for method, rows in examples.items():
            lines += [f"### {method}", ""]
            lines.append(
                markdown_table(
                    ["edit fact", "question", "answer", "P(contra)", "Q", "echo", "counted"],
                    [
                        [
                            r.get("edit_fact", ""),
                            r.get("question", ""),
                            r.get("answer", ""),
                            fmt(_exp(r.get("log_c")), "{:.2f}"),
                            _flag(r.get("is_question")),
                            _flag(r.get("is_echo")),
                            _flag(r.get("genuine")),
                        ]
                        for r in rows
                    ],
                )
            )
            lines.append("")
    return "\n".join(lines)


def _exp(value: Any) -> float | None:
    return math.exp(value) if isinstance(value, int | float) else None


def _flag(value: Any) -> str:
    return "n/a" if value is None else ("yes" if value else "no")


def _comparison_table(comps: Mapping[str, Mapping[str, Any]]) -> str:
    return markdown_table(
        ["baseline", "difference", "95% CI", "P(diff <= 0)"],
        [
            [
                name,
                fmt(c.get("diff")),
                f"[{fmt(c.get('low'))}, {fmt(c.get('high'))}]",
                fmt(c.get("p_le_0"), "{:.4f}"),
            ]
            for name, c in comps.items()
        ],
    )


def _comparison_lines(result: Mapping[str, Any]) -> list[str]:
    """The paired comparisons of the trained policy and its place against the frontier."""
    comps = result.get("comparisons") or {}
    lines: list[str] = []
    if comps:
        lines += [
            "## Trained policy vs each baseline (counted rate, paired bootstrap over facts)",
            "",
            _comparison_table(comps),
            "",
        ]
    for method, comps in (result.get("matched") or {}).items():
        if comps:
            what = (
                "n distinct questions per fact"
                if method == "trained_distinct"
                else "trained policy at that temperature"
            )
            lines += [
                f"## {method} ({what}) vs baselines (counted rate, paired bootstrap over facts)",
                "",
                _comparison_table(comps),
                "",
            ]
    fr = result.get("frontier")
    if fr:
        lines += [
            f"Temperature frontier (untrained policy, counted rate vs diversity) at the trained "
            f"policy's diversity {fmt(fr.get('diversity'))}: {fmt(fr.get('frontier_rate'))}; "
            f"trained: {fmt(fr.get('trained_rate'))}.",
            "",
        ]
    return lines


def _cell(c: Mapping[str, Any], pattern: str = "{:.2f}") -> str:
    return f"{fmt(c.get('mean'), pattern)} [{fmt(c.get('low'), pattern)}, {fmt(c.get('high'), pattern)}]"


def yield_lines(y: Mapping[str, Any] | None) -> list[str]:
    """The set each method finds per fact at each budget, and the target method's paired
    ratios to the others (``y``: :func:`contraq.evaluation.yields.yield_summary`)."""
    if not y or not y.get("methods"):
        return []
    budgets = sorted({int(n) for cells in y["methods"].values() for n in cells})
    lines = [
        "## The set per fact: distinct counted contradictions, meaning clusters, named",
        "",
        "Per fact, among its first N answered questions: distinct counted contradictions "
        "(same content words merged), meaning clusters among them (MiniLM, average linkage, "
        "cosine 0.8) and, judge-free, distinct questions whose answer names the original "
        "object; means over facts, 95% bootstrap intervals.",
        "",
    ]
    for kind in ("distinct", "clusters", "named"):
        rows = [
            [m, *(_cell(cells[str(n)][kind]) if str(n) in cells else "" for n in budgets)]
            for m, cells in y["methods"].items()
        ]
        lines += [markdown_table([kind, *(f"N={n}" for n in budgets)], rows), ""]
    target = y.get("target")
    if target and y.get("compare"):
        rows = []
        for other, cells in y["compare"].items():
            for n, c in sorted(cells.items(), key=lambda kv: int(kv[0])):
                rows.append(
                    [
                        other,
                        n,
                        *(
                            f"{fmt(c[k].get('ratio'), '{:.2f}')}x "
                            f"[{fmt(c[k].get('ratio_low'), '{:.2f}')}, "
                            f"{fmt(c[k].get('ratio_high'), '{:.2f}')}]"
                            for k in ("distinct", "clusters", "named")
                        ),
                    ]
                )
        lines += [
            f"### {target} against each method, paired over facts (ratio of means, 95% CI)",
            "",
            markdown_table(["method", "N", "distinct", "clusters", "named"], rows),
            "",
        ]
    return lines


def top_questions(
    samples: Sequence[Mapping[str, Any]], per_fact: int = 3, max_facts: int = 10
) -> list[tuple[str, str, list[Mapping[str, Any]]]]:
    """The best distinct questions per fact by unscaled log R.

    Facts are ``(subject, edit_fact)`` pairs in order of first appearance; duplicates of a
    question keep their best row.

    Returns:
        up to ``max_facts`` tuples ``(subject, edit_fact, rows)``, rows best first.
    """
    by_fact: dict[tuple[str, str], dict[str, Mapping[str, Any]]] = {}
    for row in samples:
        key = (str(row.get("subject", "")), str(row.get("edit_fact", "")))
        q = str(row.get("question", "")).strip()
        r = row.get("log_r")
        if r is None or not isinstance(r, int | float):
            continue
        best = by_fact.setdefault(key, {})
        if q not in best or float(r) > float(best[q]["log_r"]):
            best[q] = row
    out = []
    for (subject, fact), rows in list(by_fact.items())[:max_facts]:
        ranked = sorted(rows.values(), key=lambda r: float(r["log_r"]), reverse=True)
        out.append((subject, fact, ranked[:per_fact]))
    return out


def _seconds(value: Any) -> str:
    return "n/a" if value is None else f"{fmt(float(value), '{:.0f}')} s"


def _last_and_tail_mean(series: Series, tail: int = 10) -> tuple[int, float, float]:
    vals = [v for _, v in series[-tail:] if math.isfinite(v)]
    return series[-1][0], series[-1][1], (sum(vals) / len(vals) if vals else math.nan)


def _config_summary(cfg: Mapping[str, Any]) -> list[tuple[str, Any]]:
    def get(path: str) -> Any:
        node: Any = cfg
        for part in path.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return None
            node = node[part]
        return node

    keys = [
        "name",
        "seed",
        "model.source",
        "model.name_or_path",
        "model.lora_r",
        "reward.name",
        "loss.name",
        "buffer.name",
        "data.path",
        "train.max_steps",
        "train.facts_per_step",
        "train.n_samples",
        "train.lr",
        "train.logz_lr",
        "train.reward_temp.start",
        "train.reward_temp.end",
        "sampler.min_len",
        "sampler.max_len",
        "nli.name",
    ]
    return [(k, get(k)) for k in keys if get(k) is not None]


def _header_lines(run: Path) -> list[str]:
    """Title, steps and wall time (``train_summary.json``) and the key config values."""
    cfg: Mapping[str, Any] = {}
    if (run / "config.yaml").is_file():
        from omegaconf import OmegaConf

        loaded = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"), resolve=False)
        cfg = loaded if isinstance(loaded, dict) else {}
    summary: Mapping[str, Any] = {}
    if (run / "train_summary.json").is_file():
        summary = json.loads((run / "train_summary.json").read_text())
    lines = [f"# contraq run `{run.name}`", ""]
    lines += [
        f"- steps: {summary.get('steps', 'n/a')}",
        f"- wall time: {_seconds(summary.get('seconds'))}",
    ]
    if summary.get("resumed_from"):
        lines.append(f"- resumed from: `{summary['resumed_from']}`")
    lines.append("")
    if cfg:
        lines += ["## Config", "", markdown_table(["key", "value"], _config_summary(cfg)), ""]
        lines += ["Full config: `config.yaml` in the run folder.", ""]
    return lines


def _metrics_lines(metrics: Mapping[str, Series], pngs: Sequence[Path], out: Path) -> list[str]:
    """The last value and tail mean of every train/ and val/ metric, then the curves."""
    rows = []
    for name, series in metrics.items():
        if not series or not (name.startswith(("train/", "val/"))):
            continue
        step, last, tail = _last_and_tail_mean(series)
        rows.append([name, step, fmt(last, "{:.4g}"), fmt(tail, "{:.4g}")])
    lines = ["## Final metrics", ""]
    lines += [markdown_table(["metric", "last step", "last value", "mean of last 10"], rows), ""]
    lines += ["## Curves", ""]
    for p in pngs:
        rel = p.relative_to(out) if p.is_relative_to(out) else p
        lines += [f"![{p.stem}]({rel.as_posix()})", ""]
    return lines


def _samples_lines(samples: Sequence[Mapping[str, Any]]) -> list[str]:
    """The best questions per fact of ``samples.jsonl``."""
    lines = ["## Top questions per fact (samples.jsonl, by log R)", ""]
    for subject, fact, rows in top_questions(samples):
        lines += [f"**{md_cell(subject)}**: {md_cell(fact)}", ""]
        table = [
            [
                r.get("step", ""),
                r.get("question", ""),
                r.get("answer") or "",
                fmt(r.get("log_c"), "{:.2f}"),
                fmt(r.get("log_pq"), "{:.2f}"),
                fmt(r.get("log_r"), "{:.2f}"),
            ]
            for r in rows
        ]
        headers = ["step", "question", "answer", "log C", "log P_Q", "log R"]
        lines += [markdown_table(headers, table), ""]
    return lines


def _eval_lines(run: Path, out: Path) -> list[str]:
    """A link to the run's ``eval/eval.md`` and its metrics table, when it has been evaluated."""
    eval_md = run / "eval" / "eval.md"
    if not eval_md.is_file():
        return []
    rel = Path("..") / "eval" / "eval.md" if out == run / "report" else eval_md.resolve()
    lines = ["## Evaluation", "", f"See [eval.md]({rel.as_posix()}).", ""]
    eval_json = run / "eval" / "eval.json"
    if eval_json.is_file():
        lines += [eval_table(json.loads(eval_json.read_text()).get("summary", {})), ""]
    return lines


def write_report(
    run_dir: str | Path, out_dir: str | Path | None = None, smoothing: float | None = None
) -> Path:
    """Write the curves and ``report.md`` of a training run.

    Args:
        run_dir: the run folder (``outputs/<name>``).
        out_dir: where to write; ``None`` = ``run_dir/report``.
        smoothing: EMA weight of the curves; ``None`` = automatic.

    Returns:
        the path of ``report.md``.

    Raises:
        ReportError: ``run_dir`` is not a run folder (no metrics and no samples) or a file in
            it is malformed.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise ReportError(f"{run}: run folder not found")
    out = Path(out_dir) if out_dir is not None else run / "report"
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = run / "logs" / "metrics.csv"
    samples_path = jsonl_or_gz(run / "samples.jsonl")  # a committed run keeps it gzipped
    if not metrics_path.is_file() and not samples_path.is_file():
        raise ReportError(
            f"{run}: neither logs/metrics.csv nor samples.jsonl found (not a run folder?)"
        )

    metrics = read_metrics(metrics_path) if metrics_path.is_file() else {}
    samples = read_jsonl(samples_path) if samples_path.is_file() else []
    pngs = plot_curves(metrics, out, smoothing) if metrics else []

    lines = _header_lines(run)
    if metrics:
        lines += _metrics_lines(metrics, pngs, out)
    if samples:
        lines += _samples_lines(samples)
    lines += _eval_lines(run, out)
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


@dataclass(frozen=True)
class ReportConfig:
    """The settings of `contraq report` (``configs/report.yaml`` has their defaults)."""

    run: str
    out: str | None
    smoothing: float | None

    def __post_init__(self) -> None:
        if self.smoothing is not None and not 0.0 <= self.smoothing < 1.0:
            raise ConfigError("smoothing", f"must lie in [0, 1) or be null, got {self.smoothing}")


def run_report(cfg: DictConfig) -> Path:
    """`contraq report`: :func:`write_report` with the composed ``configs/report.yaml``."""
    s = typed(ReportConfig, cfg)
    path = write_report(s.run, s.out, s.smoothing)
    print(f"wrote {path}")
    return path
