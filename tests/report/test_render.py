"""``report.render`` and ``report.html``: what a reader sees of a summary (one variant, GFLOPs, a wide table, plot titles)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from tests.report.test_data import EXP, EXP2

pytestmark = pytest.mark.filterwarnings("ignore:.*noload.*:DeprecationWarning")  # inside MLflow's sqlalchemy store


@pytest.fixture(scope="module")
def df(uri):
    from rcnn_lab.report import runs

    return runs([EXP, EXP2], tracking_uri=uri)


def test_one_variant_says_there_is_nothing_to_compare_instead_of_empty_deltas(df):
    from rcnn_lab.report import render, summary

    one = summary(df[(df["experiment"] == EXP) & (df["variant"] == "base")])
    md = render(one, "md")
    assert "Only one variant: nothing to compare" in md
    assert "Δ" not in md and "p bbox_AP" not in md and "seeds for" not in md
    assert "nothing to compare" in render(one, "html")
    both = summary(df[df["experiment"] == EXP])
    assert "nothing to compare" not in render(both, "md") and "Δ bbox_AP" in render(both, "md")
    # two experiments of one variant each: still nothing to compare; one of them with two: something
    lone = summary(df[df["variant"].isin(["base", "base2"])])
    assert "nothing to compare" in render(lone, "md")


def test_gflops_column_comes_with_what_the_count_depends_on(df):
    from rcnn_lab.report import render, summary
    from rcnn_lab.report.render import GFLOPS_NOTE

    table = summary(df[df["experiment"] == EXP])
    assert GFLOPS_NOTE not in render(table, "md")  # no GFLOPs logged, no note
    table["gflops_mean"] = 1.58
    md = render(table, "md")
    assert "GFLOPs" in md.splitlines()[0] and GFLOPS_NOTE in md
    assert "aspect ratio" in GFLOPS_NOTE and "once per detection" in GFLOPS_NOTE and "min_size" in GFLOPS_NOTE


def test_html_table_wraps_its_headings_and_scrolls_inside_its_box_and_plots_have_titles(df, tmp_path):
    from rcnn_lab.report import html_report, summary
    from rcnn_lab.report.html import STYLE

    table = summary(df[df["experiment"] == EXP], metrics=["bbox_AP", "segm_AP", "bbox_AP50"])
    png = tmp_path / "report_bbox_AP.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    page = html_report(table, [("bbox_AP per variant: mean and confidence interval over seeds", png)])
    assert re.search(r"<div class='table'><table[^>]*>", page)  # every table in a box of its own
    assert ".table { max-width: 100%; overflow-x: auto;" in STYLE  # wider than the window: it scrolls, not the page
    assert re.search(r"th \{ white-space: normal;", STYLE) and re.search(r"td \{ white-space: nowrap;", STYLE)
    assert "<h3>bbox_AP per variant: mean and confidence interval over seeds</h3>" in page
    assert "<h3>report_bbox_AP.png</h3>" not in page and "title='report_bbox_AP.png'" in page
    assert html_report(table, [png]).count("<h3>report_bbox_AP</h3>") == 1  # a bare file: its name without .png


def test_report_plot_headings_say_what_each_plot_shows():
    from pathlib import Path

    from rcnn_lab.cli.report import plot_heading

    stem = Path("out/report")
    assert plot_heading(Path("out/report_segm_AP.png"), stem) == "segm_AP per variant: mean and confidence interval over seeds"
    assert plot_heading(Path("out/report_segm_AP_vs_gflops.png"), stem) == "segm_AP against gflops"
    assert plot_heading(Path("out/report_errors_segm.png"), stem) == "COCO error breakdown, masks"
    assert plot_heading(Path("out/report_pr_bbox.png"), stem) == "Precision-recall at IoU 0.5 and 0.75, boxes"
    assert plot_heading(Path("out/report_losses.png"), stem) == "Training losses per variant"
    assert "ground truth | prediction" in plot_heading(Path("out/report_gallery.png"), stem)


def test_error_breakdown_titles_fit_inside_the_figure(tmp_path, monkeypatch):
    from rcnn_lab.report import plots
    from rcnn_lab.report.errors import ERROR_TYPES, plot_errors, plot_pr

    figures = []
    real_save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or real_save(fig, path))
    err = pd.DataFrame([{"experiment": "e", "variant": v, "iou_type": "segm", **dict(zip(ERROR_TYPES, values)),
                         "pr50": np.linspace(1, 0, 101), "pr75": np.linspace(0.8, 0, 101)}
                        for v, values in (("base", [0.2, 0.4, 0.5, 0.5, 0.6, 0.8, 1.0]), ("wide", [0.3] * 7))])
    plot_errors(err, "segm", tmp_path / "e.png")
    plot_pr(err, "segm", tmp_path / "p.png")
    for fig in figures:
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            box = ax.title.get_window_extent(renderer)
            assert box.x0 >= 0 and box.x1 <= fig.bbox.width, ax.title.get_text()  # not cut on the left or right
            assert ax.title.get_text().startswith("masks (segm)")
