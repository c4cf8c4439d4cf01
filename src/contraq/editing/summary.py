"""What `contraq probe` reports: per fact, per source of probes, one table and one figure.

A *source* is either one of the dataset's probes (the edit prompt: efficacy; the rephrase
prompt: generalisation; both together) or one method of questions in the questions file
(``method``: e.g. ``trained``, ``plain``, ``beam``). For each: the share of facts on which the
edit fails on at least one probe, and failures per probe, each with a 95% bootstrap interval
over facts (:func:`contraq.evaluation.stats.bootstrap_rate`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from contraq.evaluation.stats import bootstrap_rate

DATASET_SOURCES = {
    "edit prompt (efficacy)": ("efficacy",),
    "rephrase prompt (generalisation)": ("generalisation",),
    "edit + rephrase prompts": ("efficacy", "generalisation"),
}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def per_fact(
    facts: Sequence[Mapping[str, Any]],
    metrics: Sequence[Mapping[str, Any]],
    records: Sequence[Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """One row per fact: its dataset metrics and, per question method, how many of its
    questions the edit fails on and their share."""
    out = []
    for i, (fact, met) in enumerate(zip(facts, metrics, strict=True)):
        methods: dict[str, dict[str, Any]] = {}
        for r in records:
            if r["fact_index"] == i:
                m = methods.setdefault(r["method"], {"n": 0, "fails": 0})
                m["n"] += 1
                m["fails"] += int(r["fails"])
        for m in methods.values():
            m["share"] = m["fails"] / m["n"]
        out.append({"fact_index": i, **fact, **met, "questions": methods})
    return out


def _interval(counts: dict[int, tuple[float, int]]) -> list[float]:
    return [round(x, 4) for x in bootstrap_rate(counts)]


def source_rows(facts: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per source: facts probed, probes per fact, the share of facts failing on at least one
    probe and failures per probe (each ``[rate, low, high]``)."""
    rows = []
    for name, keys in DATASET_SOURCES.items():
        probed = [f for f in facts if all(f.get(k) is not None for k in keys)]
        per = {f["fact_index"]: [not f[k] for k in keys] for f in probed}
        rows.append(_row(name, per))
    methods = sorted({m for f in facts for m in f["questions"]})
    for m in methods:
        per = {}
        for f in facts:
            q = f["questions"].get(m)
            if q:
                per[f["fact_index"]] = [True] * q["fails"] + [False] * (q["n"] - q["fails"])
        rows.append(_row(f"questions: {m}", per))
    return rows


def _row(name: str, per: Mapping[int, Sequence[bool]]) -> dict[str, Any]:
    any_fail = {f: (float(any(v)), 1) for f, v in per.items()}
    fails = {f: (float(sum(v)), len(v)) for f, v in per.items()}
    return {
        "source": name,
        "facts": len(per),
        "probes_per_fact": round(_mean([len(v) for v in per.values()]), 2),
        "facts_failing": _interval(any_fail),
        "failures_per_probe": _interval(fails),
    }


def usual_metrics(facts: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The editing literature's scores averaged over facts (``nan`` without probes)."""
    out = {}
    for key in ("efficacy", "generalisation", "locality", "locality_kept"):
        vals = [float(f[key]) for f in facts if f.get(key) is not None]
        out[key] = round(_mean(vals), 4)
    return out


def _ci(v: Sequence[float]) -> str:
    if any(math.isnan(x) for x in v):
        return "n/a"
    return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"


def markdown(summary: Mapping[str, Any]) -> str:
    """probe.md: the usual metrics, then one table of what each source of probes finds."""
    u = summary["usual_metrics"]
    lines = [
        f"# Probe of {summary['edited']} ({summary['editor']}, {summary['n_facts']} facts)",
        "",
        f"Usual metrics: efficacy {u['efficacy']:.3f}, generalisation {u['generalisation']:.3f}, "
        f"locality {u['locality']:.3f} (neighbour-answer tokens unchanged; all unchanged: "
        f"{u['locality_kept']:.3f}).",
        "",
        "| probes | facts | probes per fact | facts where the edit fails (95% CI) "
        "| failures per probe (95% CI) |",
        "|---|---|---|---|---|",
    ]
    for r in summary["sources"]:
        lines.append(
            f"| {r['source']} | {r['facts']} | {r['probes_per_fact']:g} "
            f"| {_ci(r['facts_failing'])} | {_ci(r['failures_per_probe'])} |"
        )
    lines += [
        "",
        "A question fails the edit when the judge counts the edited model's answer as a genuine "
        "contradiction of the edit fact (a question, no echo, P(contradiction) > 0.5); a "
        "dataset prompt fails it when it does not complete with the new object. Intervals: "
        "bootstrap over facts.",
        "",
    ]
    return "\n".join(lines)


def plot(summary: Mapping[str, Any], path: Path) -> Path:
    """probe.png: the share of facts where the edit fails, per source, with its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary["sources"] if not math.isnan(r["facts_failing"][0])]
    names = [r["source"] for r in rows]
    rate = [r["facts_failing"][0] for r in rows]
    err = [
        [r["facts_failing"][0] - r["facts_failing"][1] for r in rows],
        [r["facts_failing"][2] - r["facts_failing"][0] for r in rows],
    ]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.5))
    ax.barh(names, rate, xerr=err, color="tab:red", alpha=0.7, capsize=3)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of facts where the edit fails on >= 1 probe (95% CI)")
    ax.set_title(f"{summary['editor']} edit, {summary['n_facts']} facts")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
