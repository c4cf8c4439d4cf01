"""The figures of a run and of `contraq eval`: training curves (one PNG per panel) and the
per-method reward and rate-vs-diversity plots. Files only (the Agg backend), no display."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

Series = list[tuple[int, float]]

# --------------------------------------------------------------------------- smoothing


def smooth(values: Sequence[float], weight: float) -> list[float]:
    """TensorBoard-style exponential moving average with bias correction.

    ``weight`` in [0, 1): 0 = no smoothing. The debiasing keeps the first points from being
    dragged to zero. NaNs are passed through without updating the average.
    """
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smooth: weight must lie in [0, 1), got {weight}")
    out: list[float] = []
    avg, n = 0.0, 0
    for v in values:
        if not math.isfinite(v):
            out.append(v)
            continue
        n += 1
        avg = weight * avg + (1.0 - weight) * v
        out.append(avg / (1.0 - weight**n))
    return out


def default_smoothing(n_points: int) -> float:
    """More smoothing for longer series: 0 for <= 10 points, then 1 - 10/n, at most 0.9."""
    if n_points <= 10:
        return 0.0
    return min(0.9, 1.0 - 10.0 / n_points)


# --------------------------------------------------------------------------- training curves


@dataclass(frozen=True)
class Panel:
    """One PNG of training curves: the metric names drawn (train/ and val/ variants)."""

    file: str
    title: str
    metrics: tuple[str, ...]
    ylabel: str = ""


PANELS: tuple[Panel, ...] = (
    Panel("loss.png", "GFlowNet loss", ("loss",), "loss"),
    Panel("log_r.png", "log R (unscaled)", ("log_r",), "log R"),
    Panel("log_c.png", "log C = log P(contradiction)", ("log_c",), "log C"),
    Panel(
        "contradiction_rate.png", "Contradiction rate (P > 0.5)", ("contradiction_rate",), "share"
    ),
    Panel("log_pq.png", "log P_Q (base LM)", ("log_pq",), "log P_Q"),
    Panel("length.png", "Question length", ("length",), "tokens"),
    Panel(
        "diversity.png",
        "Diversity",
        ("distinct_1", "distinct_2", "diversity"),
        "distinct-n / 1 - cos",
    ),
    Panel("reward_temperature.png", "Reward temperature", ("reward_temperature",), "T_reward"),
    Panel("log_z.png", "log Z (TB head)", ("log_z", "log_pf"), "nats"),
)


def _series_for(metrics: Mapping[str, Series], name: str) -> list[str]:
    """Columns that carry ``name``: ``train/name``, ``val/name``, ``name`` (in that order)."""
    return [c for c in (f"train/{name}", f"val/{name}", name) if c in metrics and metrics[c]]


def plot_curves(
    metrics: Mapping[str, Series], out_dir: str | Path, smoothing: float | None = None
) -> list[Path]:
    """One PNG per :data:`PANELS` entry that has data: raw values faint, smoothed solid.

    Args:
        metrics: :func:`read_metrics` output.
        out_dir: folder for the PNGs (created).
        smoothing: EMA weight; ``None`` = :func:`default_smoothing` of each series' length.

    Returns:
        the PNG paths written, in panel order.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for panel in PANELS:
        columns = [c for name in panel.metrics for c in _series_for(metrics, name)]
        if not columns:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for i, col in enumerate(columns):
            steps = [s for s, _ in metrics[col]]
            values = [v for _, v in metrics[col]]
            color = f"C{i}"
            weight = default_smoothing(len(values)) if smoothing is None else smoothing
            if weight > 0 and len(values) > 1:
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(steps, smooth(values, weight), color=color, label=col, linewidth=1.6)
            else:
                ax.plot(
                    steps, values, color=color, label=col, marker="." if len(values) < 30 else None
                )
        ax.set_title(panel.title)
        ax.set_xlabel("step")
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save(fig, out / panel.file))
    return written


# --------------------------------------------------------------------------- eval plots


def _save(fig: Any, path: str | Path) -> Path:
    """Lay out, write as PNG (parent folders made) and close ``fig``."""
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_reward_distributions(log_r: Mapping[str, Sequence[float]], path: str | Path) -> Path:
    """Violin plot (with the individual points) of unscaled log R per method.

    Non-finite values (a -inf reward) are left out of the violins and counted in the labels.
    """
    names = list(log_r)
    data = [[v for v in log_r[m] if math.isfinite(v)] for m in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(names)), 4.0))
    positions = list(range(1, len(names) + 1))
    drawable = [(p, d) for p, d in zip(positions, data, strict=True) if len(d) >= 2]
    if drawable:
        ax.violinplot(
            [d for _, d in drawable], positions=[p for p, _ in drawable], showmedians=True
        )
    for p, d in zip(positions, data, strict=True):
        # Deterministic jitter keeps plots identical across runs.
        xs = [p + 0.12 * (((i * 7919) % 101) / 100 - 0.5) for i in range(len(d))]
        ax.scatter(xs, d, s=6, alpha=0.4, color="k")
    labels = []
    for m, d in zip(names, data, strict=True):
        dropped = len(log_r[m]) - len(d)
        labels.append(f"{m}\n(-inf: {dropped})" if dropped else m)
    ax.set_xticks(positions)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("log R (unscaled)")
    ax.set_title("Reward per method")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def plot_rate_vs_diversity(
    summary: Mapping[str, Mapping[str, float]],
    frontier: Sequence[str],
    path: str | Path,
    key: str = "genuine_rate",
) -> Path:
    """Counted rate (with its 95% interval) against diversity, one point per method; the
    methods named in ``frontier`` (the untrained policy at several temperatures) are joined by
    a line, ordered by diversity."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    line = []
    for i, (name, m) in enumerate(summary.items()):
        x, y = m.get("diversity", math.nan), m.get(key, math.nan)
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        lo, hi = m.get(f"{key}_low", y), m.get(f"{key}_high", y)
        ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]], fmt="o", color=f"C{i}", capsize=3)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        if name in frontier:
            line.append((x, y))
    if len(line) >= 2:
        xs, ys = zip(*sorted(line), strict=True)
        ax.plot(xs, ys, "--", color="grey", label="untrained, several temperatures")
        ax.legend(fontsize=8)
    ax.set_xlabel("diversity (1 - mean pairwise cosine, MiniLM)")
    ax.set_ylabel("counted contradiction rate")
    ax.set_title("Counted contradictions vs diversity (95% CI over facts)")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_reward_vs_diversity(summary: Mapping[str, Mapping[str, float]], path: str | Path) -> Path:
    """Mean log R against embedding diversity, one labelled point per method."""
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    for i, (name, m) in enumerate(summary.items()):
        x, y = m.get("diversity", math.nan), m.get("mean_log_r", math.nan)
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        ax.scatter([x], [y], color=f"C{i}", s=40)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("diversity (1 - mean pairwise cosine, MiniLM)")
    ax.set_ylabel("mean log R")
    ax.set_title("Reward vs diversity")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_yield(yields: Mapping[str, Any], path: str | Path) -> Path:
    """The set each method finds against the budget of answered questions per fact: distinct
    counted contradictions, meaning clusters among them and (judge-free) distinct questions
    whose answer names the original object, means over facts
    with their 95% bootstrap intervals
    (``yields``: :func:`contraq.evaluation.yields.yield_summary`)."""
    fig, axes = plt.subplots(1, 3, figsize=(14.0, 4.2))
    for ax, kind, label in zip(
        axes,
        ("distinct", "clusters", "named"),
        (
            "distinct counted contradictions per fact",
            "meaning clusters per fact",
            "distinct answers naming the original",
        ),
        strict=True,
    ):
        for i, (name, per_budget) in enumerate(yields.get("methods", {}).items()):
            pts = sorted((int(n), cell[kind]) for n, cell in per_budget.items())
            xs = [n for n, _ in pts]
            ys = [c["mean"] for _, c in pts]
            lo = [c["low"] for _, c in pts]
            hi = [c["high"] for _, c in pts]
            style = "-o" if name == yields.get("target") else "--o"
            ax.plot(xs, ys, style, color=f"C{i}", label=name, markersize=4)
            ax.fill_between(xs, lo, hi, color=f"C{i}", alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("answered questions per fact")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("The set found per fact (95% CI over facts)")
    return _save(fig, path)
