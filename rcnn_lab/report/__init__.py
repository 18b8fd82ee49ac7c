"""Reports over rcnn-lab runs in MLflow: a runs table, per-variant statistics and plots.

```python
from rcnn_lab.report import runs, summary, plot_metric

df = runs("experiments/rpn_topn_ablation.yaml")       # one row per variant x seed run
table = summary(df, metrics=["segm_AP"])              # mean / std / CI / delta / paired p per variant
plot_metric(table, "segm_AP", "reports/segm_AP.png")
```
"""

from __future__ import annotations

from rcnn_lab.report.data import latest_finished, metric_columns, runs
from rcnn_lab.report.plots import param_key, plot_grid, plot_losses, plot_metric, plot_param
from rcnn_lab.report.render import render
from rcnn_lab.report.stats import DEFAULT_METRICS, describe, paired_p, summary

__all__ = [
    "DEFAULT_METRICS", "describe", "latest_finished", "metric_columns", "paired_p", "param_key", "plot_grid",
    "plot_losses", "plot_metric", "plot_param", "render", "runs", "summary",
]
