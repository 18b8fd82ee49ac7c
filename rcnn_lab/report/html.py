"""A self-contained HTML report: the tables and every plot embedded (base64 PNG), one file to attach or mail."""

from __future__ import annotations

import base64
import html
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from rcnn_lab.report.render import display_table, preamble
from rcnn_lab.report.render import notes as table_notes

# Wide tables (19 columns for two metrics with cost) fit the window: headings wrap, cells keep their numbers on one
# line, and what is still wider scrolls inside its box, with the first (variant) column pinned.
STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
.table { max-width: 100%; overflow-x: auto; margin: 8px 0 20px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { padding: 4px 6px; border-bottom: 1px solid #ddd; text-align: right; }
td { white-space: nowrap; } th { white-space: normal; min-width: 4em; max-width: 9em; vertical-align: bottom; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; position: sticky; left: 0; }
td:first-child { background: #fff; white-space: normal; min-width: 8em; max-width: 16em; }
img { max-width: 100%; border: 1px solid #eee; margin: 6px 0 18px; }
.note { color: #555; font-size: 13px; max-width: 70em; }
"""


def _table(df: pd.DataFrame) -> str:
    table = df.to_html(index=False, escape=True, na_rep="-", border=0, float_format=lambda v: f"{v:.3f}")
    return f"<div class='table'>{table}</div>"


def _titled(plot) -> tuple[str, Path]:
    """A plot as (heading, file): given as such, or a file whose heading is its name without the suffix."""
    if isinstance(plot, tuple):
        return str(plot[0]), Path(plot[1])
    return Path(plot).stem, Path(plot)


def html_report(summary: pd.DataFrame, plots: Sequence[str | Path | tuple[str, str | Path]] = (),
                tables: dict[str, pd.DataFrame] | None = None, title: str | None = None, notes: Sequence[str] = ()) -> str:
    """The report page: title, sweep-wide settings, the summary table and its notes, extra ``tables`` (heading -> frame),
    ``plots`` (files, or (heading, file) pairs)."""
    experiments = ", ".join(dict.fromkeys(summary["experiment"])) if "experiment" in summary.columns else ""
    title = title or f"rcnn-lab report: {experiments}"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
             f"<p class='note'>generated {time.strftime('%Y-%m-%d %H:%M:%S')}</p>"]
    parts += [f"<p class='note'>{html.escape(line)}</p>" for line in [*preamble(summary), *notes]]
    parts += ["<h2>Summary</h2>", _table(display_table(summary))]
    parts += [f"<p class='note'>{html.escape(line)}</p>" for line in table_notes(summary)]
    for heading, frame in (tables or {}).items():
        parts += [f"<h2>{html.escape(heading)}</h2>", _table(frame)]
    if plots:
        parts.append("<h2>Plots</h2>")
    for heading, p in map(_titled, plots):
        data = base64.b64encode(p.read_bytes()).decode("ascii")
        parts += [f"<h3>{html.escape(heading)}</h3>", f"<img alt='{html.escape(heading)} ({html.escape(p.name)})' "
                  f"title='{html.escape(p.name)}' src='data:image/png;base64,{data}'>"]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
