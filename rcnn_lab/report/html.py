"""A self-contained HTML report: the tables and every plot embedded (base64 PNG), one file to attach or mail."""

from __future__ import annotations

import base64
import html
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from rcnn_lab.report.render import display_table, preamble

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0 20px; }
th, td { padding: 4px 8px; border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 6px 0 18px; }
.note { color: #555; font-size: 13px; }
"""


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, escape=True, na_rep="-", border=0, float_format=lambda v: f"{v:.3f}")


def html_report(summary: pd.DataFrame, plots: Sequence[str | Path] = (), tables: dict[str, pd.DataFrame] | None = None,
                title: str | None = None, notes: Sequence[str] = ()) -> str:
    """The report page: title, sweep-wide settings, the summary table, extra ``tables`` (heading -> frame), ``plots``."""
    experiments = ", ".join(dict.fromkeys(summary["experiment"])) if "experiment" in summary.columns else ""
    title = title or f"rcnn-lab report: {experiments}"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
             f"<p class='note'>generated {time.strftime('%Y-%m-%d %H:%M:%S')}</p>"]
    parts += [f"<p class='note'>{html.escape(line)}</p>" for line in [*preamble(summary), *notes]]
    parts += ["<h2>Summary</h2>", _table(display_table(summary))]
    for heading, frame in (tables or {}).items():
        parts += [f"<h2>{html.escape(heading)}</h2>", _table(frame)]
    if plots:
        parts.append("<h2>Plots</h2>")
    for p in plots:
        data = base64.b64encode(Path(p).read_bytes()).decode("ascii")
        parts += [f"<h3>{html.escape(Path(p).name)}</h3>", f"<img alt='{html.escape(Path(p).name)}' src='data:image/png;base64,{data}'>"]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
