"""``rcnn_lab.report.plots``: the metric-vs-parameter plot of a scan (variants setting one numeric key)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from rcnn_lab.report.data import RUN_COLUMNS

PNG = b"\x89PNG\r\n\x1a\n"
SCALE, MODE, FROM, ITERS = ("model.rpn.proposal_gradient_scale", "model.rpn.proposal_gradient",
                            "model.rpn.proposal_gradient_from", "train.iterations")
BACKPROP = {MODE: "backprop"}
# variant: (changed keys, segm_AP per seed 0, 1, 2) -- a proposal_gradient_scale study in miniature
VARIANTS = {
    "detach": ({}, [0.60, 0.62, 0.64]),
    "scale_0.01": ({**BACKPROP, SCALE: 0.01}, [0.58, 0.60, 0.62]),
    "mask_only": ({**BACKPROP, FROM: ["mask"]}, [0.40, 0.41, 0.42]),  # at the base scale, the only [mask] row
    "scale_0.1": ({**BACKPROP, SCALE: 0.1}, [0.50, 0.52, 0.54]),
    "scale_1": (BACKPROP, [0.20, 0.30, 0.40]),  # 1.0 is the base value: the runner does not list it as changed
    "box_only": ({**BACKPROP, SCALE: 0.1, FROM: ["box"]}, [0.55, 0.56, 0.57]),
    "detach_2x": ({ITERS: 3000}, [0.70, 0.71, 0.72]),
    "best_2x": ({**BACKPROP, SCALE: 0.1, ITERS: 3000}, [0.65, 0.66, 0.67]),
}
BASE = {MODE: "detach", SCALE: 1.0, FROM: ["box", "mask"], ITERS: 1500}


def runs_frame(variants: dict = VARIANTS) -> pd.DataFrame:
    """A ``runs()``-shaped frame: one finished run per variant x seed, params holding the full config values."""
    rows = []
    for v, (changed, values) in variants.items():
        for seed, value in enumerate(values):
            row = {c: None for c in RUN_COLUMNS}
            row.update(experiment="pgs", run_id=f"{v}-{seed}", variant=v, seed=seed, config_hash=f"h-{v}",
                       baseline=v == "detach", status="FINISHED", start_time=len(rows), end_time=len(rows) + 1,
                       changed=changed, segm_AP=value, **{**BASE, **changed})
            rows.append(row)
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def table():
    from rcnn_lab.report import summary

    return summary(runs_frame(), metrics=["segm_AP"])


def test_param_key_is_the_one_numeric_key_the_variants_set_to_several_values(table):
    from rcnn_lab.report import param_key, summary

    # train.iterations is numeric too, but the variants set it to one value (3000); from is a list
    assert param_key(table) == SCALE
    two = {**VARIANTS, "short": ({ITERS: 500}, [0.1, 0.2, 0.3])}
    assert param_key(summary(runs_frame(two), metrics=["segm_AP"])) is None  # two scanned keys: ambiguous
    assert param_key(summary(runs_frame(), metrics=["segm_AP"], group_by=SCALE)) is None  # no changed column


def test_param_series_points_per_other_keys_and_references_for_the_rest(table):
    from rcnn_lab.report.plots import param_series

    series, references = param_series(table, "segm_AP", SCALE)
    by_label = {s["label"]: s for s in series}
    assert set(by_label) == {"rpn.proposal_gradient_from=['box', 'mask'], train.iterations=1500",
                             "rpn.proposal_gradient_from=['box'], train.iterations=1500",
                             "rpn.proposal_gradient_from=['box', 'mask'], train.iterations=3000"}
    scan = by_label["rpn.proposal_gradient_from=['box', 'mask'], train.iterations=1500"]
    assert scan["x"].tolist() == [0.01, 0.1, 1.0] and scan["names"] == ["scale_0.01", "scale_0.1", "scale_1"]
    assert scan["mean"] == pytest.approx([0.60, 0.52, 0.30])
    row = table.set_index("variant").loc["scale_1"]
    assert (scan["low"][-1], scan["high"][-1]) == (row["segm_AP_ci_low"], row["segm_AP_ci_high"])
    assert by_label["rpn.proposal_gradient_from=['box'], train.iterations=1500"]["names"] == ["box_only"]
    # scale_1 keeps the base value but shares the scan's other keys: the scan's point at 1.0; the detach
    # variants keep it too, but differ in proposal_gradient from every scanned variant: references
    # mask_only keeps the base scale and shares its other keys with no variant that sets it: a reference too
    assert [(r["label"], r["baseline"]) for r in references] == [
        ("detach (baseline)", True), ("mask_only", False), ("detach_2x", False)]
    assert [r["mean"] for r in references] == pytest.approx([0.62, 0.41, 0.71])


def test_dodged_spreads_the_points_that_share_an_x_and_leaves_the_rest():
    from rcnn_lab.report.plots import dodged

    scan = np.array([0.01, 0.1, 1.0])
    assert [x.tolist() for x in dodged([scan], log=True)] == [scan.tolist()]  # one series: as is
    assert [x.tolist() for x in dodged([scan, np.array([0.3])], log=True)] == [scan.tolist(), [0.3]]  # none shared
    # 0.1 is shared by three series: their points move -0.1, 0 and +0.1 decade (step 0.05 of 2 decades); the
    # scan's other points stay on their ticks
    a, b, c = dodged([scan, np.array([0.1]), np.array([0.1])], log=True, step=0.05)
    assert a.tolist() == pytest.approx([0.01, 0.1 * 10 ** -0.1, 1.0]) and a[0] == 0.01 and a[2] == 1.0
    assert b.tolist() == [0.1] and c.tolist() == pytest.approx([0.1 * 10 ** 0.1])
    d, e = dodged([np.array([1.0, 2.0]), np.array([2.0])], log=False, step=0.1)  # linear: a fraction of the span
    assert d.tolist() == pytest.approx([1.0, 1.95]) and e.tolist() == pytest.approx([2.05])


def test_plot_param_writes_a_png_and_rejects_a_key_no_variant_sets(table, tmp_path):
    from rcnn_lab.errors import ConfigError
    from rcnn_lab.report import plot_param

    assert plot_param(table, "segm_AP", SCALE, tmp_path / "p.png").read_bytes()[:8] == PNG
    with pytest.raises(ConfigError, match="no variant sets this key"):
        plot_param(table, "segm_AP", "model.num_classes", tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_report_draws_the_scan_with_plot_param(table, tmp_path, monkeypatch):
    import rcnn_lab.report as report
    from rcnn_lab.cli.report import write_plots

    calls = []
    monkeypatch.setattr(report, "plot_losses", lambda *a, **k: None)
    for name in ("plot_param", "plot_grid"):
        real = getattr(report, name)
        monkeypatch.setattr(report, name, lambda *a, _n=name, _f=real: calls.append((_n, a[2])) or _f(*a))
    written = write_plots(table, runs_frame(), tmp_path / "report", None, None)
    assert [p.name for p in written] == ["report_segm_AP.png", "report_segm_AP_vs_model_rpn_proposal_gradient_scale.png",
                                         "report_segm_AP_vs_train_iterations.png"]
    assert calls == [("plot_param", SCALE), ("plot_grid", ITERS)]
