"""Render a ``summary()`` table as markdown, HTML (compact, human-readable), CSV or JSON (every column)."""

from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd

from rcnn_lab.report.stats import summary_metrics

FORMATS = ("md", "csv", "html", "json")


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    v = float(value)
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.{digits}f}"


def _signed(value: Any) -> str:
    text = _num(value)
    return text if text == "-" or text.startswith("-") else f"+{text}"


def _p(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.2g}" if value < 0.001 else f"{value:.3f}"


def _cell(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return json.dumps(value, default=str)


def display_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The compact text view: ``mean ± std``, CI, delta and p per metric; baseline row marked."""
    label = summary.attrs.get("label") or ("variant" if "variant" in summary.columns else summary.columns[1])
    conf = f"{100 * float(summary.attrs.get('confidence', 0.95)):g}% CI"
    out = pd.DataFrame(index=summary.index)
    if summary["experiment"].nunique() > 1:
        out["experiment"] = summary["experiment"]
    out[label] = [f"{_cell(v)} (baseline)" if b else _cell(v) for v, b in zip(summary[label], summary["baseline"])]
    if "changed" in summary.columns:
        out["changed"] = summary["changed"].fillna("")
    if "variants" in summary.columns:
        out["variants"] = summary["variants"].astype(str)
    out["runs"] = summary["finished"].astype(str)
    for col in ("failed", "running", "killed"):
        if summary[col].any():
            out[col] = summary[col].astype(str)
    mde = summary.attrs.get("mde")
    compare = nothing_to_compare(summary) is None  # with one variant there are no deltas to show
    for m in summary_metrics(summary):
        out[m] = [f"{_num(a)} ± {_num(b)}" if not math.isnan(b) else _num(a)
                  for a, b in zip(summary[f"{m}_mean"], summary[f"{m}_std"])]
        out[f"{m} {conf}"] = [f"[{_num(lo)}, {_num(hi)}]" if not math.isnan(lo) else "-"
                              for lo, hi in zip(summary[f"{m}_ci_low"], summary[f"{m}_ci_high"])]
        if not compare:
            continue
        out[f"Δ {m}"] = summary[f"{m}_delta"].map(_signed)
        out[f"p {m}"] = summary[f"{m}_p"].map(_p)
        if f"{m}_p_holm" in summary.columns and _comparisons(summary, m) > 1:
            out[f"p Holm {m}"] = summary[f"{m}_p_holm"].map(_p)
        if f"{m}_seeds" in summary.columns and summary[f"{m}_seeds"].notna().any():
            out[f"seeds for Δ {m}"] = summary[f"{m}_seeds"].map(_seeds)
        if mde is not None and f"{m}_seeds_mde" in summary.columns:
            out[f"seeds for {mde:g} pt {m}"] = summary[f"{m}_seeds_mde"].map(_seeds)
    for col, title, digits in COST_COLUMNS:
        if col in summary.columns and summary[col].notna().any():
            scale = 1e-6 if col == "params_mean" else 1.0
            out[title] = summary[col].map(lambda v, s=scale, d=digits: _num(v * s, d))
    return out.reset_index(drop=True)


# summary column, display title, digits below 10
COST_COLUMNS = (("train_time_s_mean", "train s", 1), ("images_per_s_mean", "train img/s", 1),
                ("eval_images_per_s_mean", "eval img/s", 1), ("params_mean", "params (M)", 2),
                ("gflops_mean", "GFLOPs", 2), ("peak_memory_mb_mean", "peak MB", 0))


def nothing_to_compare(summary: pd.DataFrame) -> str | None:
    """A sentence when no experiment of ``summary`` has two rows to compare (one variant), else None."""
    if len(summary) == 0 or (summary.groupby("experiment").size() > 1).any():
        return None
    label = summary.attrs.get("label") or "variant"
    what = "one variant" if label == "variant" else f"one value of {label}"
    return (f"Only {what}: nothing to compare (no deltas or p-values); add variants: or grid: to the experiment "
            "to compare settings.")


GFLOPS_NOTE = ("GFLOPs: one inference forward of the first validation image, resized to the configured "
               "model.transform.min_size / max_size; the count depends on that image's aspect ratio and on how many "
               "detections the model makes on it (the mask head runs once per detection), so the same model can "
               "differ slightly between datasets or training states.")


def notes(summary: pd.DataFrame) -> list[str]:
    """Sentences shown under the table: nothing to compare with one variant, what GFLOPs depend on."""
    out = [n for n in [nothing_to_compare(summary)] if n]
    if "gflops_mean" in summary.columns and summary["gflops_mean"].notna().any():
        out.append(GFLOPS_NOTE)
    return out


def _comparisons(summary: pd.DataFrame, metric: str) -> int:
    """The largest number of variants compared with the baseline within one experiment."""
    counts = summary[summary[f"{metric}_p"].notna()].groupby("experiment").size()
    return int(counts.max()) if len(counts) else 0


def _seeds(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return "> 10000" if math.isinf(value) else f"{int(value)}"


def preamble(summary: pd.DataFrame) -> list[str]:
    """One line per experiment with keys every variant shares (``--set`` ones marked): shown once above the table."""
    lines = []
    overrides = summary.attrs.get("overrides", {})
    for experiment, shared in summary.attrs.get("shared", {}).items():
        if not shared:
            continue
        mine = overrides.get(experiment, {})
        parts = [f"{k}={_cell(v)}" + (" (--set)" if k in mine else "") for k, v in shared.items()]
        lines.append(f"Same in every variant of {experiment}: {', '.join(parts)}")
    return lines


def markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table of text cells (no ``tabulate`` needed); numbers right-aligned."""
    header = [str(c) for c in table.columns]
    rows = [[_cell(v).replace("|", "\\|") for v in row] for row in table.itertuples(index=False)]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    right = [all(_looks_numeric(r[i]) for r in rows) and bool(rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if r else ("-" * (w + 2)) for w, r in zip(widths, right)) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def _looks_numeric(text: str) -> bool:
    head = text.split(" ", 1)[0].lstrip("+-[")
    return text == "-" or head.replace(".", "", 1).rstrip(",").isdigit()


def render(summary: pd.DataFrame, fmt: str = "md") -> str:
    """``summary`` as text in ``fmt``: md/html show ``display_table``; csv/json hold every numeric column."""
    if fmt == "md":
        head = "".join(f"{line}\n" for line in preamble(summary))
        tail = "".join(f"\n{line}\n" for line in notes(summary))
        return head + ("\n" if head else "") + markdown(display_table(summary)) + "\n" + tail
    if fmt == "html":
        import html

        head = "".join(f"<p>{html.escape(line)}</p>\n" for line in preamble(summary))
        tail = "".join(f"<p>{html.escape(line)}</p>\n" for line in notes(summary))
        return head + display_table(summary).to_html(index=False, escape=True, na_rep="-", border=0) + "\n" + tail
    if fmt == "csv":  # lists / dicts (changed values) as JSON text
        return summary.map(lambda v: json.dumps(v) if isinstance(v, (list, dict)) else v).to_csv(index=False)
    if fmt == "json":
        return summary.to_json(orient="records", indent=2, double_precision=10) + "\n"
    raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
