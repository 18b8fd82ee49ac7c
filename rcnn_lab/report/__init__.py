"""Reports over rcnn-lab runs in MLflow: a runs table, per-variant statistics, error analysis, cost and plots.

```python
from rcnn_lab.report import runs, summary, plot_metric, errors, plot_errors, plot_gallery, html_report

df = runs("experiments/rpn_topn_ablation.yaml")       # one row per variant x seed run
table = summary(df, metrics=["segm_AP"], mde=1.0)    # mean / std / CI / delta / paired p / Holm / seeds needed
plot_metric(table, "segm_AP", "reports/segm_AP.png")
err = errors(df)                                      # COCO error breakdown + PR curves from the saved detections
plot_errors(err, "segm", "reports/errors_segm.png")
plot_gallery(df, "reports/gallery.png", seed=0)       # rows: variants, columns: the eval.gallery images
```
"""

from __future__ import annotations

from rcnn_lab.report.cost import pareto_front, plot_cost
from rcnn_lab.report.data import latest_finished, metric_columns, runs
from rcnn_lab.report.errors import ERROR_TYPES, analyze, errors, per_class, plot_errors, plot_pr
from rcnn_lab.report.gallery import gallery_panels, plot_gallery
from rcnn_lab.report.html import html_report
from rcnn_lab.report.plots import param_key, plot_grid, plot_losses, plot_metric, plot_param
from rcnn_lab.report.render import render
from rcnn_lab.report.significance import holm, seeds_needed
from rcnn_lab.report.stats import DEFAULT_METRICS, describe, paired_p, summary

__all__ = [
    "DEFAULT_METRICS", "ERROR_TYPES", "analyze", "describe", "errors", "gallery_panels", "holm", "html_report",
    "latest_finished", "metric_columns", "paired_p", "param_key", "pareto_front", "per_class", "plot_cost", "plot_errors",
    "plot_gallery", "plot_grid", "plot_losses", "plot_metric", "plot_param", "plot_pr", "render", "runs", "seeds_needed",
    "summary",
]
