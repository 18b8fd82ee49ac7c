"""Cost next to accuracy: a metric against a cost per variant, with the Pareto front.

The costs are the means ``runner.artifacts.cost_metrics`` logs per run and ``summary()`` averages:
``gflops`` (inference, one image at the configured size), ``params``, ``peak_memory_mb``,
``train_time_s``; throughputs (``images_per_s``, ``eval_images_per_s``) count as costs inverted
(higher is cheaper). A variant is on the Pareto front when no other variant is at least as good on
both axes and better on one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from rcnn_lab.errors import ConfigError, Problem, did_you_mean

COSTS = {"gflops": "inference GFLOPs", "params": "parameters (M)", "peak_memory_mb": "peak training memory (MB)",
         "train_time_s": "train time (s)", "images_per_s": "training images/s", "eval_images_per_s": "eval images/s"}
HIGHER_IS_CHEAPER = ("images_per_s", "eval_images_per_s")


def pareto_front(cost: np.ndarray, score: np.ndarray, higher_is_cheaper: bool = False) -> np.ndarray:
    """Boolean mask of the points no other point dominates (cost no worse, score no lower, one strictly better)."""
    c = -np.asarray(cost, float) if higher_is_cheaper else np.asarray(cost, float)
    s = np.asarray(score, float)
    ok = np.isfinite(c) & np.isfinite(s)
    out = np.zeros(len(c), bool)
    for i in np.flatnonzero(ok):
        others = ok & (np.arange(len(c)) != i)
        dominated = others & (c <= c[i]) & (s >= s[i]) & ((c < c[i]) | (s > s[i]))
        out[i] = not dominated.any()
    return out


def plot_cost(summary: pd.DataFrame, metric: str, path: str | Path, cost: str = "gflops") -> Path | None:
    """Scatter of ``<metric>_mean`` (with its CI) against ``<cost>_mean``; Pareto-optimal variants joined by a line.

    Returns None (writes nothing) when no row has that cost logged.
    """
    from rcnn_lab.report.plots import _check_metric, _figure, _label_column, _names, _save, _yerr, metric_label

    if cost not in COSTS:
        raise ConfigError([Problem("--cost", f"unknown cost {cost!r}{did_you_mean(cost, list(COSTS))} "
                                   f"(costs: {', '.join(COSTS)})")])
    _check_metric(summary, metric)
    col = f"{cost}_mean"
    if col not in summary.columns or summary[col].isna().all():
        return None
    x = summary[col].to_numpy(float) * (1e-6 if cost == "params" else 1.0)
    y = summary[f"{metric}_mean"].to_numpy(float)
    names = _names(summary, _label_column(summary))
    base = summary["baseline"].to_numpy(bool) if "baseline" in summary.columns else np.zeros(len(summary), bool)
    front = pareto_front(x, y, cost in HIGHER_IS_CHEAPER)
    fig, ax = _figure(6.5, 4.5)
    ax.errorbar(x, y, yerr=_yerr(summary, metric), fmt="none", ecolor="gray", capsize=3, alpha=0.7)
    ax.scatter(x, y, c=["tab:orange" if b else "tab:blue" for b in base], s=[60 if f else 30 for f in front],
               edgecolors=["black" if f else "none" for f in front], zorder=3)
    order = np.argsort(x[front])
    ax.plot(x[front][order], y[front][order], "--", color="black", linewidth=0.8, label="Pareto front")
    for xi, yi, name in zip(x, y, names):
        if np.isfinite(xi) and np.isfinite(yi):
            ax.annotate(name, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(COSTS[cost] + (" (higher is cheaper)" if cost in HIGHER_IS_CHEAPER else ""))
    ax.set_ylabel(metric_label(metric))
    ax.set_title(f"{metric} vs {COSTS[cost]} (mean and CI; baseline in orange)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)
