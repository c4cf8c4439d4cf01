"""`contraq compare`: tables from `contraq eval` folders, no model (``configs/compare.yaml``).

- ``mode=paired``: side A minus side B, paired over facts (bootstrap over facts,
  :mod:`contraq.evaluation.stats`): the counted and the judge-free independent rate, each side's
  rate and the difference; with ``budget=N`` also the set per fact (distinct counted questions,
  meaning clusters, named; :mod:`contraq.evaluation.yields`), difference and ratio. A side is
  one eval folder or a list of them pooled (their questions per fact add up); ``FOLDER@METHOD``
  takes another method of a folder than ``method``.
- ``mode=splits``: several runs each evaluated on the test and the validation split with the
  same baselines; rates on the union of the two fact sets, a Markdown table.
- ``mode=labels``: precision of blind hand labels of counted questions per method (Wilson
  interval), and the counted rate times it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from scipy.stats import binomtest, fisher_exact

from contraq.config.checks import ConfigError
from contraq.config.settings import typed
from contraq.evaluation.metrics import counted_texts, flag_counts
from contraq.evaluation.reuse import read_eval_folder
from contraq.evaluation.stats import bootstrap_rate, paired_bootstrap
from contraq.files import iter_jsonl, jsonl_or_gz

MODES = ("paired", "splits", "labels")
# The counted rate; the answer names the pre-edit object; distinct counted questions per fact.
KEYS = ("genuine_rate", "independent_rate", "counted_distinct")
PAIRED_KEYS = KEYS[:2]
Records = list[dict[str, Any]]


@dataclass(frozen=True)
class CompareConfig:
    """The settings of `contraq compare` (``configs/compare.yaml`` has their defaults)."""

    mode: str
    a: Any = None  # an eval folder (str) or a list of them
    b: Any = None
    method: str = "trained"
    budget: int | None = None
    key: str = "genuine_rate"
    test: Any = None
    val: Any = None
    labels: str | None = None
    records: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError("mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.key not in KEYS:
            raise ConfigError("key", f"must be one of {', '.join(KEYS)}, got {self.key!r}")
        if self.budget is not None and self.budget < 1:
            raise ConfigError(
                "budget", f"must be a positive number of questions or null, got {self.budget}"
            )
        needed = {"paired": ("a", "b"), "splits": ("test", "val"), "labels": ("labels", "records")}
        for name in needed[self.mode]:
            if getattr(self, name) in (None, "", []):
                raise ConfigError(name, f"missing; mode={self.mode} needs {name}=...")


def folders(value: Any) -> list[str]:
    """A setting that names one folder or a list of them, as a list."""
    return [str(value)] if isinstance(value, str) else [str(v) for v in value]


# ---------------------------------------------------------------------------- records


def method_records(spec: str, method: str, key: str) -> Records:
    """``FOLDER`` (its ``method``) or ``FOLDER@METHOD``: that method's records.

    Raises:
        ConfigError: naming ``key`` and the folder: not an eval folder, or no such method.
    """
    folder, _, named = spec.partition("@")
    method = named or method
    _, by_method = read_eval_folder(Path(folder), key)
    if method not in by_method:
        raise ConfigError(key, f"{folder} has no {method} records (it has {', '.join(by_method)})")
    return by_method[method]


def side_records(specs: Sequence[str], method: str, key: str) -> Records:
    """The records of every folder of one side, one list (questions per fact add up)."""
    return [r for spec in specs for r in method_records(spec, method, key)]


def fact_set(records: Records) -> set[int]:
    return {int(r["fact_index"]) for r in records}


def same_facts(a: Records, b: Records, a_specs: Sequence[str], b_specs: Sequence[str]) -> None:
    """Raises ConfigError naming both sides when their facts differ (pairing needs one set)."""
    fa, fb = fact_set(a), fact_set(b)
    if fa != fb:
        raise ConfigError(
            "b",
            f"{' + '.join(b_specs)} holds other facts than {' + '.join(a_specs)} "
            f"({len(fa - fb)} only in A, {len(fb - fa)} only in B); pairing needs the same facts",
        )


# ---------------------------------------------------------------------------- paired


def interval(rate: float, low: float, high: float, digits: int = 3) -> str:
    return f"{rate:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def signed(c: dict[str, float], digits: int = 3) -> str:
    return f"{c['diff']:+.{digits}f} [{c['low']:+.{digits}f}, {c['high']:+.{digits}f}]"


def paired_rate_lines(a: Records, b: Records) -> list[str]:
    """Per rate key: each side's pooled rate, then A - B paired over facts and P(diff <= 0)."""
    lines = []
    for key in PAIRED_KEYS:
        ca, cb = flag_counts(a, key), flag_counts(b, key)
        c = paired_bootstrap(ca, cb)
        lines.append(
            f"{key}: A {interval(*bootstrap_rate(ca))} vs B {interval(*bootstrap_rate(cb))}"
        )
        lines.append(f"{key}: A - B = {signed(c)} (P(diff<=0) {c['p_le_0']:.3f})")
    return lines


def set_lines(a: Records, b: Records, budget: int, embed: Callable[[list[str]], Any]) -> list[str]:
    """The set per fact at ``budget``: per kind, A - B and A / B of the means over facts."""
    from contraq.evaluation.yields import KINDS, fact_yields, yield_summary

    s = yield_summary(
        {"A": fact_yields(a, [budget], embed), "B": fact_yields(b, [budget], embed)}, "A"
    )
    lines = [f"the set per fact at {budget} questions, means over facts:"]
    for kind in KINDS:
        c = s["compare"]["B"][str(budget)][kind]
        lines.append(
            f"{kind:9s} A - B {signed(c, 2)}  "
            f"A / B {c['ratio']:.2f}x [{c['ratio_low']:.2f}, {c['ratio_high']:.2f}]"
        )
    return lines


def side_label(specs: Sequence[str], method: str) -> str:
    names = [s if "@" in s else f"{s}@{method}" for s in specs]
    return " + ".join(names) + (f" ({len(names)} pooled)" if len(names) > 1 else "")


def compare_paired(cfg: CompareConfig, embed: Callable[[list[str]], Any] | None = None) -> str:
    """`mode=paired`: the report as text. ``embed``: the sentence encoder (budget only; the
    MiniLM :class:`contraq.lm.embedding.Embedder` on the CPU when not given)."""
    a_specs, b_specs = folders(cfg.a), folders(cfg.b)
    a = side_records(a_specs, cfg.method, "a")
    b = side_records(b_specs, cfg.method, "b")
    same_facts(a, b, a_specs, b_specs)
    lines = [
        f"A: {side_label(a_specs, cfg.method)}",
        f"B: {side_label(b_specs, cfg.method)}",
        f"{len(fact_set(a))} facts, paired; 95% bootstrap intervals over facts",
        *paired_rate_lines(a, b),
    ]
    if cfg.budget is not None:
        if embed is None:
            from contraq.lm.embedding import Embedder

            embed = Embedder(device="cpu").encode
        lines += set_lines(a, b, cfg.budget, embed)
    return "\n".join(lines)


# ---------------------------------------------------------------------------- splits

# A union fact's index: split number x _STRIDE + its index in the split's eval.
_STRIDE = 1_000_000


def key_counts(records: Records, key: str) -> dict[int, tuple[float, int]]:
    """``{fact: (hits, questions)}`` of ``key``; for ``counted_distinct``, ``(distinct counted
    questions, 1)``, so the "rate" is their mean per fact."""
    if key == "counted_distinct":
        return {f: (float(len(texts)), 1) for f, texts in counted_texts(records).items()}
    return flag_counts(records, key)


def union(test: str, val: str) -> dict[str, Records]:
    """``{method: records of both splits}``, each record's fact renamed to (split, fact)."""
    out: dict[str, Records] = {}
    for k, (split, folder) in enumerate((("test", test), ("val", val))):
        _, by_method = read_eval_folder(Path(folder), split)
        for method, records in by_method.items():
            out.setdefault(method, []).extend(
                {**r, "fact_index": k * _STRIDE + int(r["fact_index"])} for r in records
            )
    return out


def same_baselines(runs: dict[str, dict[str, Records]], names: Sequence[str]) -> None:
    """Every run holds the first run's baseline questions, answers and counts (log R may differ:
    ``baselines_from`` recomputes it under each run's reward)."""
    fields = ("fact_index", "question", "answer", "genuine")

    def rows(records: Records | None) -> list[tuple] | None:
        return None if records is None else [tuple(r.get(f) for f in fields) for r in records]

    first = next(iter(runs.values()))
    for run, methods in runs.items():
        for name in names:
            if rows(methods.get(name)) != rows(first[name]):
                raise ConfigError("test", f"{run}: its {name} records differ from the first run's")


def split_cells(records: Records, key: str) -> tuple[list[str], float, float]:
    """``[test, val, both]`` rate cells and the lower and upper bound of both."""
    cells = []
    for k in (0, 1):
        part = [r for r in records if r["fact_index"] // _STRIDE == k]
        cells.append(interval(*bootstrap_rate(key_counts(part, key))))
    rate, low, high = bootstrap_rate(key_counts(records, key))
    return [*cells, interval(rate, low, high)], low, high


def splits_header(first: Records, method: str, key: str) -> list[str]:
    questions = flag_counts(first, "genuine_rate")
    per_fact = sum(n for _, n in questions.values()) / max(len(questions), 1)
    n_facts = len(key_counts(first, key))
    return [
        f"| {method} ({n_facts} facts x {per_fact:.3g}), {key} | test | val | both [95% CI] | "
        "above every baseline's interval | minus beam, paired (both) |",
        "|---|---|---|---|---|---|",
    ]


def compare_splits(cfg: CompareConfig) -> str:
    """`mode=splits`: the Markdown table: each run's ``method``, every run pooled (not for
    ``counted_distinct``: distinct among all runs' questions is a larger budget), each baseline."""
    tests, vals = folders(cfg.test), folders(cfg.val)
    if len(tests) != len(vals):
        raise ConfigError(
            "val", f"needs one folder per test folder ({len(tests)}), got {len(vals)}"
        )
    runs = {t: union(t, v) for t, v in zip(tests, vals, strict=True)}
    first = next(iter(runs.values()))
    baselines = [m for m in first if m != "trained" and not m.startswith("trained_")]
    same_baselines(runs, baselines)
    if "beam" not in baselines:
        raise ConfigError("test", f"{tests[0]} has no beam records (the paired column's baseline)")
    for run, methods in runs.items():
        if cfg.method not in methods:
            raise ConfigError("method", f"{run}: no {cfg.method} records")
    base_cells = {m: split_cells(first[m], cfg.key) for m in baselines}
    highest = max(high for _, _, high in base_cells.values())
    rows = {run: m[cfg.method] for run, m in runs.items()}
    if cfg.key != "counted_distinct":
        rows["every run pooled"] = [r for m in runs.values() for r in m[cfg.method]]
    beam = key_counts(first["beam"], cfg.key)
    lines = splits_header(first[cfg.method], cfg.method, cfg.key)
    for name, records in rows.items():
        cells, low, _ = split_cells(records, cfg.key)
        c = paired_bootstrap(key_counts(records, cfg.key), beam)
        above = f"{'yes' if low > highest else 'no'} ({low:.3f} vs {highest:.3f})"
        lines.append(f"| {name} | {' | '.join(cells)} | {above} | {signed(c)} |")
    for name in baselines:
        lines.append(f"| {name} | {' | '.join(base_cells[name][0])} | | |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- labels


def wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion ``k / n`` (scipy)."""
    ci = binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def read_labels(path: str) -> dict[str, list[bool]]:
    """``{method: real or not, per labelled question}`` of a JSON Lines file.

    Raises:
        ConfigError: ``labels``: the file is absent, or a line lacks ``method``/``real``.
    """
    if not jsonl_or_gz(Path(path)).is_file():
        raise ConfigError("labels", f"{path} not found (JSON Lines of method and real)")
    out: dict[str, list[bool]] = {}
    try:
        for lineno, row in iter_jsonl(path):
            missing = [k for k in ("method", "real") if k not in row]
            if missing:
                raise ValueError(f"{path}:{lineno}: no {', '.join(missing)}")
            out.setdefault(str(row["method"]), []).append(bool(row["real"]))
    except ValueError as exc:
        raise ConfigError("labels", str(exc)) from None
    return out


def compare_labels(cfg: CompareConfig) -> str:
    """`mode=labels`: per labelled method, real / labelled, the precision with its 95% Wilson
    interval, the eval's counted rate and their product; Fisher's exact test for two methods."""
    labels = read_labels(str(cfg.labels))
    result, _ = read_eval_folder(Path(str(cfg.records)), "records")
    summary = result.get("summary", {})
    lines = [
        "| method | real / labelled | precision [95% CI] | counted rate | counted x precision |",
        "|---|---|---|---|---|",
    ]
    table = []
    for method in sorted(labels):
        if method not in summary:
            raise ConfigError("records", f"{cfg.records}/eval.json has no method {method} (labels)")
        k, n = sum(labels[method]), len(labels[method])
        counted = summary[method]["genuine_rate"]
        table.append([k, n - k])
        lines.append(
            f"| {method} | {k} / {n} | {interval(k / n, *wilson(k, n), digits=2)} | "
            f"{counted:.3f} | {counted * k / n:.3f} |"
        )
    if len(table) == 2:
        lines.append(f"\nFisher's exact test, two-sided: P = {fisher_exact(table).pvalue:.3f}")
    return "\n".join(lines)


def run_compare(cfg: DictConfig) -> str:
    """`contraq compare`: the composed ``configs/compare.yaml``'s table, printed."""
    c = typed(CompareConfig, cfg)
    text = {"paired": compare_paired, "splits": compare_splits, "labels": compare_labels}[c.mode](c)
    print(text)
    return text
