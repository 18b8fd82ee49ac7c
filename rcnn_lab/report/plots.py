"""PNG plots of reports (matplotlib ``Figure`` + Agg canvas: no pyplot state, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rcnn_lab.errors import ConfigError, Problem, did_you_mean
from rcnn_lab.report.data import latest_finished
from rcnn_lab.report.stats import summary_metrics

DPI = 120


def _figure(width: float = 7.0, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def config_columns(summary: pd.DataFrame) -> list[str]:
    """The dotted config-key columns of a ``summary()`` table (not the statistics of a ``NAME@N`` metric with dots)."""
    stats = tuple(f"{m}_" for m in summary_metrics(summary))
    return [c for c in summary.columns if "." in c and not c.startswith(stats)]


def metric_label(metric: str, width: int = 28) -> str:
    """An axis label for ``metric``: a long training-metric name (``grad_norm/LOSS/COMPONENT@N``) broken after its slashes."""
    if len(metric) <= width or "/" not in metric:
        return metric
    lines, line = [], ""
    for part in metric.replace("/", "/\n").split("\n"):
        if line and len(line) + len(part) > width:
            lines.append(line)
            line = ""
        line += part
    return "\n".join([*lines, line])


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")  # a legend or title past the edge is kept, not cut
    return path


def _label_column(table: pd.DataFrame) -> str:
    label = table.attrs.get("label")
    if label in table.columns:
        return label
    return "variant" if "variant" in table.columns else table.columns[1]


def _names(table: pd.DataFrame, label: str) -> list[str]:
    many = table["experiment"].nunique() > 1
    texts = [v if isinstance(v, str) else str(v) for v in table[label]]
    return [f"{e}/{t}" if many else t for e, t in zip(table["experiment"], texts)]


def _check_metric(table: pd.DataFrame, metric: str) -> None:
    known = summary_metrics(table)
    if metric not in known:
        raise ConfigError([Problem("--metric", f"metric {metric!r} is not in the summary{did_you_mean(metric, known)} "
                                   f"(summarized: {', '.join(known) or 'none'})")])


def _yerr(table: pd.DataFrame, metric: str) -> np.ndarray:
    mean = table[f"{metric}_mean"].to_numpy(float)
    low = np.nan_to_num(mean - table[f"{metric}_ci_low"].to_numpy(float), nan=0.0)
    high = np.nan_to_num(table[f"{metric}_ci_high"].to_numpy(float) - mean, nan=0.0)
    return np.vstack([low, high])


def _confidence(table: pd.DataFrame) -> str:
    return f"{100 * float(table.attrs.get('confidence', 0.95)):g}% CI"


def plot_metric(summary: pd.DataFrame, metric: str, path: str | Path) -> Path:
    """Bar chart of ``<metric>_mean`` per row with Student-t CI error bars; the baseline bar is highlighted."""
    _check_metric(summary, metric)
    label = _label_column(summary)
    names = _names(summary, label)
    mean = summary[f"{metric}_mean"].to_numpy(float)
    base = summary["baseline"].to_numpy(bool) if "baseline" in summary.columns else np.zeros(len(summary), bool)
    fig, ax = _figure(max(5.0, 0.6 * len(names) + 2.5), 4.2)
    x = np.arange(len(names))
    ax.bar(x, np.nan_to_num(mean), yerr=_yerr(summary, metric), capsize=4,
           color=["tab:orange" if b else "tab:blue" for b in base], alpha=0.85)
    tops = np.fmax(mean, summary[f"{metric}_ci_high"].to_numpy(float))
    for xi, m, top, n in zip(x, mean, tops, summary[f"{metric}_n"]):
        if not math.isnan(m):
            ax.annotate(f"{m:.3f}\nn={int(n)}", (xi, top), textcoords="offset points", xytext=(0, 3), ha="center",
                        va="bottom", fontsize=7)
    if np.isfinite(tops).any() and np.nanmax(tops) > 0:
        ax.set_ylim(top=float(np.nanmax(tops)) * 1.15)  # room for the labels
    ax.set_xticks(x, names, rotation=30 if len(names) > 3 else 0, ha="right" if len(names) > 3 else "center", fontsize=8)
    ax.set_ylabel(metric_label(metric))
    ax.set_title(f"{metric}: mean and {_confidence(summary)} (baseline in orange)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_grid(summary: pd.DataFrame, metric: str, key: str, path: str | Path) -> Path:
    """``metric`` against the values of config key ``key``, one line per value of the other changed keys."""
    _check_metric(summary, metric)
    keys = config_columns(summary)
    if key not in summary.columns:
        raise ConfigError([Problem("--group-by", f"the summary has no column {key!r}{did_you_mean(key, keys)} "
                                   f"(config keys: {', '.join(keys) or 'none'})")])
    others = [c for c in keys if c != key]
    values = list(dict.fromkeys(summary[key].map(_cell)))
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    ticks = sorted(values) if numeric else values
    fig, ax = _figure(6.5, 4.2)
    group_cols = ["experiment", *others]
    many = summary["experiment"].nunique() > 1
    cells = summary.assign(**{c: summary[c].map(_cell) for c in others})
    for combo, rows in cells.groupby(group_cols, sort=False, dropna=False):
        combo = combo if isinstance(combo, tuple) else (combo,)
        parts = ([combo[0]] if many else []) + [f"{_short(k)}={v}" for k, v in zip(others, combo[1:])]
        rows = rows.assign(_x=rows[key].map(_cell)).sort_values("_x", key=lambda s: s.map(ticks.index))
        xs = rows["_x"].to_numpy(float) if numeric else rows["_x"].map(ticks.index).to_numpy(float)
        ax.errorbar(xs, rows[f"{metric}_mean"].to_numpy(float), yerr=_yerr(rows, metric), marker="o", capsize=3,
                    label=", ".join(map(str, parts)) or None)
    if not numeric:
        ax.set_xticks(range(len(ticks)), [str(t) for t in ticks])
    ax.set_xlabel(key)
    ax.set_ylabel(metric_label(metric))
    ax.set_title(f"{metric} vs {_short(key)} (mean, {_confidence(summary)})", fontsize=10)
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _short(key: str) -> str:
    """The last two parts of a dotted key (``model.rpn.pre_nms_top_n.train`` -> ``pre_nms_top_n.train``)."""
    return ".".join(key.split(".")[-2:])


def _cell(value: Any) -> Any:
    """A table cell usable as a plot category (lists become their text)."""
    return str(value) if isinstance(value, (list, dict, tuple)) else value


def loss_histories(runs_df: pd.DataFrame, tracking_uri: str | None = None, metric: str = "loss") -> dict[str, pd.Series]:
    """Per-step ``metric`` of the newest finished run per variant x seed: {run_id: Series indexed by step}."""
    from mlflow import MlflowClient

    from rcnn_lab.runner.tracking import resolve_uri

    uris = runs_df.attrs.get("tracking_uris", {})
    clients: dict[str, Any] = {}
    out: dict[str, pd.Series] = {}
    for _, row in latest_finished(runs_df).iterrows():
        uri = tracking_uri or uris.get(row["experiment"]) or resolve_uri(None)
        client = clients.setdefault(uri, MlflowClient(tracking_uri=uri))
        history = client.get_metric_history(row["run_id"], metric)
        if history:
            s = pd.Series({m.step: m.value for m in sorted(history, key=lambda m: (m.step, m.timestamp))}, dtype=float)
            out[row["run_id"]] = s.sort_index()
    return out


def plot_losses(runs_df: pd.DataFrame, path: str | Path, tracking_uri: str | None = None, per_run: bool = False,
                smooth: int | None = None) -> Path | None:
    """Training ``loss`` curves: the mean over seeds per variant (or one line per run with ``per_run``).

    Histories come from ``MlflowClient.get_metric_history``; ``smooth`` is a moving-average window in steps
    (default: about 1/50 of the longest curve). Returns None (and writes nothing) when no run logged a loss.
    """
    histories = loss_histories(runs_df, tracking_uri)
    if not histories:
        return None
    longest = max(len(s) for s in histories.values())
    window = max(1, smooth if smooth is not None else longest // 50)
    meta = runs_df.set_index("run_id")
    many = runs_df["experiment"].nunique() > 1
    fig, ax = _figure(7.0, 4.2)
    groups: dict[str, list[pd.Series]] = {}
    for run_id, s in histories.items():
        r = meta.loc[run_id]
        name = f"{r['experiment']}/{r['variant']}" if many else str(r["variant"])
        groups.setdefault(name if not per_run else f"{name} s{r['seed']}", []).append(s)
    for name, curves in groups.items():
        mean = pd.concat(curves, axis=1).mean(axis=1, skipna=True).sort_index()
        mean = mean.rolling(window, min_periods=1).mean()
        n = f" (mean of {len(curves)})" if len(curves) > 1 else ""
        ax.plot(mean.index.to_numpy(), mean.to_numpy(), label=f"{name}{n}", linewidth=1.2)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss" + (f" (moving average, {window} steps)" if window > 1 else ""))
    ax.set_title("training loss", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _sets(changed: Any, key: str) -> bool:
    """Whether a summary row's ``changed`` text (``k=v, k2=v2``) sets ``key``."""
    return isinstance(changed, str) and f", {key}=" in f", {changed}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)) \
        and math.isfinite(float(value))


def param_key(summary: pd.DataFrame) -> str | None:
    """The one numeric config key that the variants set to two or more values (None if none or several).

    Only keys a variant *sets* count (its ``changed`` entries): a variant that keeps the base value
    of the key (e.g. a ``detach`` baseline next to ``proposal_gradient_scale`` variants) is not a point
    of the scan but a reference, see :func:`param_series`.
    """
    if "changed" not in summary.columns:
        return None
    found = []
    for key in summary.attrs.get("changed_keys", []):
        if key not in summary.columns:
            continue
        values = [v for v, c in zip(summary[key], summary["changed"]) if _sets(c, key)]
        if values and all(_is_number(v) for v in values) and len(set(values)) >= 2:
            found.append(key)
    return found[0] if len(found) == 1 else None


def param_series(summary: pd.DataFrame, metric: str, key: str) -> tuple[list[dict], list[dict]]:
    """What :func:`plot_param` draws: ``(series, references)``.

    ``series``: the rows that set ``key`` to a number, one series per combination of the other changed
    keys' values (``{"label", "x", "mean", "low", "high", "names"}``, sorted by ``x``); a row that keeps the
    base value of ``key`` joins the series whose other keys it shares (the scan's base point: ``changed``
    only lists keys that differ from the base). ``references``: every other row
    (``{"label", "mean", "low", "high", "baseline"}``), e.g. a ``detach`` variant for which the key does not
    apply, drawn as horizontal lines.
    """
    _check_metric(summary, metric)
    if key not in summary.columns:
        raise ConfigError([Problem(key, "no variant sets this key; nothing to plot against it")])
    label = _label_column(summary)
    names = _names(summary, label)
    changed = summary["changed"] if "changed" in summary.columns else pd.Series([None] * len(summary))
    others = [k for k in summary.attrs.get("changed_keys", []) if k != key and k in summary.columns]
    combos = [tuple(_cell(summary[k].iloc[i]) for k in others) for i in range(len(summary))]
    numeric = [_is_number(v) for v in summary[key]]
    sets = [_sets(c, key) and n for c, n in zip(changed, numeric)]
    scanned = {c for c, s in zip(combos, sets) if s}
    point = [s or (n and c in scanned) for s, n, c in zip(sets, numeric, combos)]
    varying = [j for j, k in enumerate(others) if len({c[j] for c, p in zip(combos, point) if p}) > 1]
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(combos):
        if point[i]:
            groups.setdefault(tuple(c[j] for j in varying), []).append(i)
    series = []
    for combo, rows in groups.items():
        rows = sorted(rows, key=lambda i: float(summary[key].iloc[i]))
        sub = summary.iloc[rows]
        series.append({
            "label": ", ".join(f"{_short(others[j])}={v}" for j, v in zip(varying, combo)) or f"varying {_short(key)}",
            "x": sub[key].to_numpy(float), "mean": sub[f"{metric}_mean"].to_numpy(float),
            "low": sub[f"{metric}_ci_low"].to_numpy(float), "high": sub[f"{metric}_ci_high"].to_numpy(float),
            "names": [names[i] for i in rows],
        })
    base = summary["baseline"].to_numpy(bool) if "baseline" in summary.columns else np.zeros(len(summary), bool)
    references = [{"label": names[i] + (" (baseline)" if base[i] else ""), "baseline": bool(base[i]),
                   "mean": float(summary[f"{metric}_mean"].iloc[i]), "low": float(summary[f"{metric}_ci_low"].iloc[i]),
                   "high": float(summary[f"{metric}_ci_high"].iloc[i])}
                  for i in range(len(summary)) if not point[i]]
    return series, references


def dodged(xs: list[np.ndarray], log: bool, step: float = 0.02) -> list[np.ndarray]:
    """The x positions of several series' points, where ``m`` series have a point at the same x: those
    ``m`` points move apart (the ``j``-th of them by ``(j - (m - 1) / 2) * step`` of the axis span, a factor
    of ``10**(that * decades)`` on a log axis) so that their intervals do not hide each other. Every
    other point keeps its x."""
    out = [np.asarray(x, float).copy() for x in xs]
    values = [v for x in out for v in x.tolist()]
    if not values:
        return out
    lo, hi = min(values), max(values)
    span = (math.log10(hi / lo) if log and lo > 0 else hi - lo) or 1.0
    for value in sorted(set(values)):
        sharing = [(k, i) for k, x in enumerate(out) for i in np.flatnonzero(x == value).tolist()]
        for j, (k, i) in enumerate(sharing if len(sharing) > 1 else []):
            shift = (j - (len(sharing) - 1) / 2) * step * span
            out[k][i] = value * 10 ** shift if log else value + shift
    return out


def plot_param(summary: pd.DataFrame, metric: str, key: str, path: str | Path) -> Path:
    """``metric`` (mean and CI) against the numeric config key ``key`` (e.g. ``model.rpn.proposal_gradient_scale``).

    Variants that set ``key`` are points, one line per combination of their other changed keys; variants
    outside the scan (e.g. a baseline the key does not apply to) are horizontal lines with their CI as a band
    (:func:`param_series` says which is which). The x axis is
    logarithmic when the values are positive and span a factor of 10 or more.
    """
    series, references = param_series(summary, metric, key)
    if not series:
        raise ConfigError([Problem(key, "no variant sets this key to a number; nothing to plot against it")])
    fig, ax = _figure(9.5, 4.4)
    xs = np.concatenate([s["x"] for s in series])
    log = bool((xs > 0).all() and xs.max() / xs.min() >= 10)
    for s, x in zip(series, dodged([s["x"] for s in series], log), strict=True):
        yerr = np.vstack([np.nan_to_num(s["mean"] - s["low"]), np.nan_to_num(s["high"] - s["mean"])])
        ax.errorbar(x, s["mean"], yerr=yerr, marker="o", capsize=3, label=s["label"])
    colours = iter(["black", "tab:gray", "tab:brown", "tab:olive", "tab:pink", "tab:cyan"])  # not the series' colours
    for r in references:
        colour = next(colours, "black")
        ax.axhline(r["mean"], color=colour, linestyle="--", linewidth=1.2, label=r["label"])
        if math.isfinite(r["low"]) and math.isfinite(r["high"]):
            ax.axhspan(r["low"], r["high"], color=colour, alpha=0.12)
    if log:
        ax.set_xscale("log")
    ticks = sorted(set(xs.tolist()))
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel(key)
    ax.set_ylabel(metric_label(metric))
    ax.set_title(f"{metric} vs {_short(key)}\n(mean, {_confidence(summary)}; dashed: variants outside the scan)",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    return _save(fig, path)
