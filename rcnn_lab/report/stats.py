"""Aggregate runs per variant (or per config value): mean, std, Student-t CI, delta and paired t-test vs baseline."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from rcnn_lab.errors import ConfigError, Problem, did_you_mean
from rcnn_lab.report.data import RUN_COLUMNS, PathOrName, latest_finished, metric_columns, runs

DEFAULT_METRICS = ("bbox_AP", "segm_AP")
STATS = ("mean", "std", "n", "ci_low", "ci_high", "delta", "p", "p_holm", "seeds")
# Extra per-row means (speed and cost); ``images_per_s`` is training throughput (see ``_throughput``), ``params``,
# ``gflops`` and ``peak_memory_mb`` are what ``runner.artifacts.cost_metrics`` logs.
SPEED = ("train_time_s", "eval_images_per_s", "images_per_s", "params", "gflops", "peak_memory_mb")


def describe(values: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """mean, sample std (ddof=1), n and the two-sided Student-t interval of the mean (NaN where undefined)."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    n = len(x)
    mean = float(x.mean()) if n else math.nan
    std = float(x.std(ddof=1)) if n > 1 else math.nan
    if n > 1:
        from scipy import stats  # here: a one-seed sweep's summary (each run's end) never imports scipy (0.6 s)

        half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
        low, high = mean - half, mean + half
    else:
        low = high = math.nan
    return {"mean": mean, "std": std, "n": n, "ci_low": low, "ci_high": high}


def paired_p(values: pd.Series, reference: pd.Series) -> float:
    """p-value of ``scipy.stats.ttest_rel`` over the seeds both series have (index = seed); NaN below 2 seeds."""
    both = pd.concat([values.rename("a"), reference.rename("b")], axis=1, join="inner").dropna()
    if len(both) < 2:
        return math.nan
    from scipy import stats
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # identical differences: scipy warns and returns NaN
        return float(stats.ttest_rel(both["a"].to_numpy(float), both["b"].to_numpy(float)).pvalue)


def _hashable(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def _group_value(value: Any) -> Any:
    """A ``group_by`` cell as a hashable group label (runs without the key group under ``(unset)``)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "(unset)"
    return _hashable(value)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _sort_key(value: Any) -> tuple:
    """Numbers in numeric order before everything else in text order (grid values)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not pd.isna(value):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def _throughput(rows: pd.DataFrame) -> pd.Series:
    """Training images/s per run: ``final/images_per_s`` when logged, else iterations x batch size / train time."""
    if "images_per_s" in rows.columns:
        return rows["images_per_s"]
    needed = ("train.iterations", "data.batch_size", "train_time_s")
    if not all(c in rows.columns for c in needed):
        return pd.Series(math.nan, index=rows.index)
    work = pd.to_numeric(rows["train.iterations"], errors="coerce") * pd.to_numeric(rows["data.batch_size"], errors="coerce")
    return work / rows["train_time_s"].where(rows["train_time_s"] > 0)


def _check_metrics(df: pd.DataFrame, metrics: Sequence[str] | None) -> list[str]:
    available = metric_columns(df)
    if metrics is None:
        chosen = [m for m in DEFAULT_METRICS if m in available]
        return chosen or ([m for m in available if m not in SPEED][:2] if available else list(DEFAULT_METRICS))
    if not available and not (df["status"] == "FINISHED").any():
        return list(metrics)  # nothing finished yet: every metric column is legitimately absent
    problems = [
        Problem("--metric", f"unknown metric {m!r}{did_you_mean(m, available)} (available: {', '.join(available) or 'none'})")
        for m in metrics if m not in available
    ]
    if problems:
        raise ConfigError(problems)
    return list(metrics)


def _label_column(df: pd.DataFrame, group_by: str | None) -> str:
    if group_by is None:
        return "variant"
    if group_by not in df.columns or group_by in RUN_COLUMNS or group_by in metric_columns(df):
        keys = [c for c in df.columns if c not in RUN_COLUMNS and c not in metric_columns(df)]
        raise ConfigError([Problem("--group-by", f"unknown config key {group_by!r}{did_you_mean(group_by, keys)}; "
                                   "use a dotted key of the resolved config, e.g. model.rpn.nms_thresh")])
    return group_by


def _baseline_label(df: pd.DataFrame, label: str, baseline: str | None, experiment: str) -> Any:
    labels = list(dict.fromkeys(df[label]))
    if baseline is not None:
        for value in labels:
            if value == baseline or _text(value) == baseline:
                return value
        names = [_text(v) for v in labels]
        what = "variant" if label == "variant" else f"value of {label}"
        raise ConfigError([Problem("--baseline", f"no {what} {baseline!r} in experiment {experiment!r}"
                                   f"{did_you_mean(baseline, names)} (choices: {', '.join(names)})")])
    tagged = df[df["baseline"]]
    return tagged[label].iloc[0] if len(tagged) else None


def summary(df_or_experiments: pd.DataFrame | PathOrName | Sequence[PathOrName], metrics: Sequence[str] | None = None,
            group_by: str | None = None, baseline: str | None = None, confidence: float = 0.95,
            tracking_uri: str | None = None, mde: float | None = None) -> pd.DataFrame:
    """One row per (experiment, variant) -- or per value of the config key ``group_by`` -- over finished runs.

    Only the newest FINISHED run per (variant, seed, config hash) is used; FAILED / RUNNING / KILLED runs are
    counted (``failed``, ``running``, ``killed``) and never averaged. Per metric ``m`` (default: those of
    ``DEFAULT_METRICS`` that were logged): ``m_mean``, ``m_std`` (ddof=1), ``m_n``, ``m_ci_low`` / ``m_ci_high``
    (Student-t, ``confidence``), ``m_delta`` (mean minus the baseline's mean) and ``m_p`` (paired t-test vs the
    baseline over the seeds both have, values averaged per seed; NaN below 2 seeds), ``m_p_holm`` (``m_p``
    Holm-adjusted over the experiment's comparisons with the baseline), ``m_seeds`` (paired seeds needed to detect
    ``m_delta`` at alpha 0.05 / power 0.8) and, with ``mde`` (AP points: 1 = 0.01), ``m_seeds_mde``; see
    ``report.significance``. The baseline is the variant tagged baseline, or ``baseline`` (a variant name, or a
    ``group_by`` value). Also the means ``<s>_mean`` of every ``SPEED`` column (time, throughput, cost),
    ``changed`` (``key=value`` text of what differs between the experiment's variants) and, per variant, one
    column per such key holding the variant's value. Keys every variant changes the same way (``--set`` on the
    command line, sweep-wide settings) are left out of ``changed``: ``table.attrs["shared"]`` maps each
    experiment to them and ``table.attrs["overrides"]`` to those set on the command line.
    """
    from rcnn_lab.report.significance import holm, paired_sd, seeds_needed

    df = df_or_experiments if isinstance(df_or_experiments, pd.DataFrame) else runs(df_or_experiments, tracking_uri)
    if df.empty:
        raise ConfigError([Problem("EXPERIMENT", "no rcnn-lab runs to summarize; run `rcnn-lab run EXP.yaml` first")])
    if not 0 < confidence < 1:
        raise ConfigError([Problem("--confidence", f"must be between 0 and 1 (e.g. 0.95), got {confidence}")])
    if mde is not None and not mde > 0:
        raise ConfigError([Problem("--mde", f"must be a positive number of AP points (1 = 0.01 AP), got {mde}")])
    chosen = _check_metrics(df, metrics)
    label = _label_column(df, group_by)
    df = df.copy()
    df[label] = df[label].map(_hashable if group_by is None else _group_value)
    done = latest_finished(df)
    speed = done.assign(images_per_s=_throughput(done))
    rows: list[dict[str, Any]] = []
    changed_keys: list[str] = []
    shared_all: dict[str, dict] = {}
    overrides_all: dict[str, dict] = {}
    for experiment in dict.fromkeys(df["experiment"]):
        mine, fin = df[df["experiment"] == experiment], speed[speed["experiment"] == experiment]
        shared_all[experiment] = shared = _shared_changes(mine)
        overrides_all[experiment] = {k: v for o in mine.get("overrides", pd.Series(dtype=object)) if isinstance(o, dict)
                                     for k, v in o.items() if k in shared}
        first = len(rows)
        base = _baseline_label(mine, label, baseline, experiment)
        order = list(dict.fromkeys(mine.sort_values("start_time", kind="stable")[label]))
        if group_by is not None:
            order.sort(key=_sort_key)
        present = [m for m in chosen if m in fin.columns]
        per_seed = {g: fin[fin[label] == g].groupby("seed")[present].mean() for g in order}
        ref = {m: describe(fin[fin[label] == base][m].tolist())["mean"] if m in present and base is not None else math.nan
               for m in chosen}
        for g in order:
            runs_g, fin_g = mine[mine[label] == g], fin[fin[label] == g]
            status = runs_g["status"].value_counts()
            row: dict[str, Any] = {"experiment": experiment, label: g, "baseline": g == base}
            if group_by is None:
                changed = {k: v for k, v in next((c for c in runs_g["changed"] if c), {}).items() if k not in shared}
                row["changed"] = ", ".join(f"{k}={_text(v)}" for k, v in changed.items())
                changed_keys.extend(changed)
            else:
                row["variants"] = runs_g["variant"].nunique()
            row.update(finished=len(fin_g), failed=int(status.get("FAILED", 0)), running=int(status.get("RUNNING", 0)),
                       killed=int(status.get("KILLED", 0)))
            for m in chosen:
                d: dict[str, float] = describe(fin_g[m].tolist() if m in present else [], confidence)
                d["delta"] = d["mean"] - ref[m]
                paired = base is not None and g != base and m in present
                d["p"] = paired_p(per_seed[g][m], per_seed[base][m]) if paired else math.nan
                sd = paired_sd(per_seed[g][m], per_seed[base][m]) if paired else math.nan
                d["p_holm"] = d["p"]  # adjusted below, once every comparison of the experiment is known
                d["seeds"] = seeds_needed(d["delta"], sd)
                row.update({f"{m}_{s}": d[s] for s in STATS})
                if mde is not None:
                    row[f"{m}_seeds_mde"] = seeds_needed(mde / 100, sd)
            for s in SPEED:
                row[f"{s}_mean"] = describe(fin_g[s].tolist() if s in fin_g.columns else [])["mean"]
            rows.append(row)
        for m in chosen:  # Holm over this experiment's comparisons with its baseline
            adjusted = holm([r[f"{m}_p"] for r in rows[first:]])
            for r, p in zip(rows[first:], adjusted):
                r[f"{m}_p_holm"] = p
    out = pd.DataFrame(rows)
    keys = list(dict.fromkeys(changed_keys))
    for key in keys:  # the variant's value of each key any variant changes (the base value where it keeps it)
        out[key] = [_key_value(df, r["experiment"], r["variant"], key) for _, r in out.iterrows()]
    out.attrs.update(metrics=chosen, label=label, changed_keys=keys, confidence=confidence, shared=shared_all,
                     overrides=overrides_all, mde=mde)
    return out


def _shared_changes(runs_df: pd.DataFrame) -> dict[str, Any]:
    """Changed keys with the same value in every variant of one experiment (sweep-wide ``--set`` and the like)."""
    per_variant = [next((c for c in g["changed"] if c), {}) for _, g in runs_df.groupby("variant", sort=False)]
    if not per_variant:
        return {}
    first = per_variant[0]
    return {k: v for k, v in first.items() if all(k in c and _hashable(c[k]) == _hashable(v) for c in per_variant[1:])}


def _key_value(df: pd.DataFrame, experiment: str, variant: str, key: str) -> Any:
    rows = df[(df["experiment"] == experiment) & (df["variant"] == variant)]
    for changed in rows["changed"]:
        if key in changed:
            return changed[key]
    if key in rows.columns:
        values = rows[key].dropna()
        if len(values):
            return values.iloc[0]
    return None


def summary_metrics(table: pd.DataFrame) -> list[str]:
    """Metric names of a ``summary()`` table (those with a confidence interval)."""
    return [c[: -len("_ci_low")] for c in table.columns if c.endswith("_ci_low")]


def mixed_environments(df: pd.DataFrame) -> list[str]:
    """One line per experiment whose averaged or paired runs ran on different devices or CPU thread counts.

    CPU results depend on the thread count (floating-point reductions split differently), so a
    ``--parallel 2`` run (one thread per worker) and a plain run of the same config differ; the
    summary's means and paired tests would mix the two. Runs logged before these tags existed are ignored.
    """
    done = latest_finished(df)
    out = []
    for experiment in dict.fromkeys(done["experiment"]):
        mine = done[done["experiment"] == experiment]
        parts = []
        for col, what in (("device", "devices"), ("threads", "CPU thread counts")):
            if col in mine.columns:
                values = sorted({str(v) for v in mine[col].dropna()})
                if len(values) > 1:
                    parts.append(f"{what} ({', '.join(values)})")
        if parts:
            out.append(f"runs of {experiment!r} differ in {' and '.join(parts)}: its means and paired tests mix them; "
                       "rerun with one setting (the same --parallel / OMP_NUM_THREADS, the same device)")
    return out
