"""Training metrics as report metrics: ``NAME@N`` is each run's mean of per-step metric ``NAME`` over its last ``N`` steps.

A final evaluation says *what* a variant reached; the metrics logged while it trained say *why*
(``loss_rpn_box_reg``: how well the RPN's own boxes fit; ``grad_norm/LOSS/COMPONENT``: what a loss
sends into a component, logged every ``train.grad_probe_every`` steps). ``rcnn-lab report --metric
loss_rpn_box_reg@200`` puts such a value in the same table as the AP, with the same statistics
across seeds (mean, interval, paired delta and p against the baseline). The window is in steps: the
points logged at steps ``last - N + 1 .. last`` of each run, however often the metric was logged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from rcnn_lab.errors import ConfigError, Problem, cut

SEP = "@"


def is_step_metric(name: str) -> bool:
    return SEP in name


def parse(name: str) -> tuple[str, int]:
    """``"loss_rpn_box_reg@200"`` -> ``("loss_rpn_box_reg", 200)``; a one-line ``--metric`` error otherwise."""
    key, _, window = name.rpartition(SEP)
    if not key or not window.isascii() or not window.isdigit() or len(window) > 18 or int(window) <= 0:
        raise ConfigError([Problem("--metric", f"{cut(name)!r}: a training metric is NAME@STEPS with STEPS > 0, e.g. "
                                   "loss_rpn_box_reg@200 (its mean over each run's last 200 steps)")])
    return key, int(window)


def window_mean(history: Sequence, window: int) -> float:
    """Mean of the points of ``history`` (MLflow ``Metric``s) in the last ``window`` steps; NaN when empty."""
    if not history:
        return math.nan
    last = max(m.step for m in history)
    values = [m.value for m in history if m.step > last - window]
    return sum(values) / len(values)


def add_step_means(df: pd.DataFrame, names: Sequence[str], tracking_uri: str | None = None) -> pd.DataFrame:
    """``df`` (a ``runs()`` frame) with one column per ``NAME@N`` in ``names``: each FINISHED run's
    window mean (NaN for other runs). Raises ``ConfigError`` when no run logged ``NAME``."""
    from mlflow import MlflowClient

    from rcnn_lab.report.data import run_uri
    from rcnn_lab.runner import tracking as tr

    wanted = [(name, *parse(name)) for name in dict.fromkeys(names)]
    if not wanted:
        return df
    tr.quiet_mlflow()
    out, clients = df.copy(), {}
    for name, key, window in wanted:
        values = []
        for _, row in df.iterrows():
            if row["status"] != "FINISHED":
                values.append(math.nan)
                continue
            uri = run_uri(df, row["experiment"], tracking_uri)
            client = clients.setdefault(uri, MlflowClient(tracking_uri=uri))
            values.append(window_mean(client.get_metric_history(row["run_id"], key), window))
        if len(df) and all(math.isnan(v) for v in values):
            raise ConfigError([Problem("--metric", f"no finished run logged the training metric {cut(key)!r}; per-step "
                                       "metrics are loss, loss_*, lr, step_time_s, images_per_s and, with "
                                       "train.grad_probe_every, grad_norm/LOSS/COMPONENT")])
        out[name] = pd.Series(values, index=df.index, dtype=float)
    out.attrs = dict(df.attrs)
    return out
