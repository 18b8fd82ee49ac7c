"""The summary a sweep run carries in MLflow, rewritten as its runs end (``runner.sweep.run_plan(summarize=...)``).

The runner knows the outcomes of its runs (final metrics in memory, finished or skipped) but not the
statistics, which live here, above it; ``rcnn-lab run`` hands :func:`summarize` down. It returns

* **metrics** per variant, named ``<metric>/<variant>`` (the mean over the finished seeds) and
  ``<metric>/<variant> ci_low`` / ``ci_high`` (Student-t interval), for the headline metrics: the runs
  table can show them as columns and the chart view groups them by metric, one section each;
* a **description** (``mlflow.note.content``, markdown, shown on the run page): the report's table
  (mean ± std, CI, delta from the baseline, paired p-value) with how many runs have finished.
"""

from __future__ import annotations

import math
import re
import time

import pandas as pd

from rcnn_lab.report.render import COST_COLUMNS, display_table, markdown, nothing_to_compare, preamble
from rcnn_lab.report.stats import summary

HEADLINE = ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50")  # the sweep run's per-variant metrics
NOTE_METRICS = ("bbox_AP", "segm_AP")  # the description's table (two metrics keep it readable)
NOTE_LIMIT = 7500  # characters: MLflow keeps tag values up to 8000


def metric_key(metric: str, variant: str, stat: str = "") -> str:
    """``segm_AP/wide``, ``segm_AP/wide ci_low``: characters MLflow refuses in a key become ``_`` (``=`` becomes ``:``)."""
    name = re.sub(r"[^A-Za-z0-9_\-. :/]", "_", variant.replace("=", ":"))
    return f"{metric}/{name}" + (f" {stat}" if stat else "")


def outcomes_frame(experiment: str, outcomes) -> pd.DataFrame:
    """Outcomes (``runner.outcome.Outcome``) as a ``report.runs()``-shaped frame: one row per planned run."""
    rows = []
    for i, o in enumerate(outcomes):
        status = str(o.status)
        done = status in ("FINISHED", "SKIPPED") and o.metrics
        v = o.run.variant
        rows.append({
            "experiment": experiment, "run_id": o.run_id, "parent_run_id": None, "variant": v.name, "seed": o.run.seed,
            "config_hash": o.run.hash, "baseline": bool(v.baseline),
            "status": "FINISHED" if done else "RUNNING" if status == "RUNNING-ELSEWHERE" else status,
            "start_time": i, "end_time": i, "changed": dict(v.changed), "overrides": {}, "device": None, "threads": None,
            "error": o.error, **({k: float(x) for k, x in o.metrics.items() if isinstance(x, (int, float))} if done else {}),
        })
    return pd.DataFrame(rows)


def summarize(exp, outcomes, planned: int) -> tuple[dict[str, float], str]:
    """(metrics, markdown description) of a sweep of ``planned`` runs, ``outcomes`` so far; see the module docstring."""
    df = outcomes_frame(exp.tracking_name, outcomes)
    finished = int((df["status"] == "FINISHED").sum()) if len(df) else 0
    head = (f"**{exp.name}**: {finished} of {max(planned, len(outcomes))} runs finished or found finished "
            f"(updated {time.strftime('%Y-%m-%d %H:%M:%S')})")
    present = [m for m in HEADLINE if m in df.columns]
    if not finished or not present:
        return {}, head + "\n\nNo run has finished yet."
    table = summary(df, metrics=present)
    metrics = {}
    for _, row in table.iterrows():
        for m in present:
            for stat, col in (("", "mean"), ("ci_low", "ci_low"), ("ci_high", "ci_high")):
                value = row[f"{m}_{col}"]
                if not math.isnan(value):
                    metrics[metric_key(m, str(row["variant"]), stat)] = float(value)
    shown = summary(df, metrics=[m for m in NOTE_METRICS if m in present] or present)
    text = display_table(shown)
    cost = {title for _, title, _ in COST_COLUMNS}  # the run page shows the table at its own width: accuracy only
    text = text[[c for c in text.columns if not str(c).startswith("seeds for") and c not in cost]]
    lines = [head, "", *preamble(shown)]
    lone = nothing_to_compare(shown)
    lines += ["", markdown(text), "", lone or (
        f"Mean ± std over seeds, {100 * shown.attrs['confidence']:g}% Student-t interval; Δ: difference from the "
        "baseline's mean; p: paired t-test over the seeds both have. `rcnn-lab report` gives every metric, the cost "
        "columns and plots.")]
    note = "\n".join(lines)
    if len(note) > NOTE_LIMIT:
        note = note[:NOTE_LIMIT].rsplit("\n", 1)[0] + "\n\n(table cut: `rcnn-lab report` shows all of it)"
    return metrics, note

