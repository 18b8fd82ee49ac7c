"""``rcnn_lab.report.steps``: training metrics (``NAME@N``) in the report, on the store ``test_data.build_store`` logs."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from rcnn_lab.errors import ConfigError
from rcnn_lab.report import steps
from tests.report.test_data import EXP, GRAD_NORM, SEEDS, VARIANTS
from tests.runner.conftest import cli

pytestmark = pytest.mark.filterwarnings("ignore:.*noload.*:DeprecationWarning")  # inside MLflow's sqlalchemy store


@pytest.fixture(scope="module")
def df(uri):
    from rcnn_lab.report import runs

    return steps.add_step_means(runs(EXP, tracking_uri=uri), ["loss@3", f"{GRAD_NORM}@5"])


def test_the_window_is_the_last_n_steps_however_often_the_metric_was_logged():
    history = [SimpleNamespace(step=s, value=float(s)) for s in (50, 100, 150, 200)]
    assert steps.window_mean(history, 50) == 200.0  # steps 151..200
    assert steps.window_mean(history, 100) == 175.0  # steps 101..200: 150 and 200
    assert steps.window_mean(history, 101) == 150.0  # steps 100..200
    assert steps.window_mean(history, 10_000) == 125.0
    assert math.isnan(steps.window_mean([], 5))


def test_each_finished_run_gets_its_window_mean_and_unfinished_ones_none(df):
    done = df[df["status"] == "FINISHED"]
    for _, row in done.iterrows():  # loss = 2.0 - 0.1 step + 0.01 seed at steps 1..10: steps 8, 9, 10
        assert row["loss@3"] == pytest.approx(1.1 + 0.01 * row["seed"])
        assert row[f"{GRAD_NORM}@5"] == pytest.approx(0.5 + 0.1 * row["seed"] + 0.10)  # only step 10 is in 6..10
    assert df.loc[df["status"] != "FINISHED", "loss@3"].isna().all() and (df["status"] != "FINISHED").any()


def test_summary_treats_them_like_final_metrics(df):
    from rcnn_lab.report import metric_columns, summary

    assert {"loss@3", f"{GRAD_NORM}@5"} <= set(metric_columns(df))
    table = summary(df, metrics=["bbox_AP", "loss@3", f"{GRAD_NORM}@5"]).set_index("variant")
    for variant in VARIANTS:
        assert table.loc[variant, "loss@3_mean"] == pytest.approx(1.1 + 0.01 * sum(SEEDS) / len(SEEDS))
        assert table.loc[variant, "loss@3_n"] == len(SEEDS)
    assert table.loc["low", "loss@3_delta"] == pytest.approx(0.0, abs=1e-12)  # same losses as the baseline, paired


@pytest.mark.parametrize("name", ["loss@0", "loss@x", "@5", "loss@-3"])
def test_a_malformed_name_is_a_one_line_metric_error(name):
    with pytest.raises(ConfigError, match="--metric: .*NAME@STEPS"):
        steps.parse(name)


def test_a_metric_no_run_logged_is_named(uri):
    from rcnn_lab.report import runs

    with pytest.raises(ConfigError, match="no finished run logged the training metric 'los'"):
        steps.add_step_means(runs(EXP, tracking_uri=uri), ["los@10"])


@pytest.mark.filterwarnings("error::UserWarning")  # e.g. a dotted metric name mistaken for a config key in a plot
def test_report_command_tables_and_plots_them(uri, tmp_path):
    code, out, err = cli("report", EXP, "--uri", uri, "--metric", f"bbox_AP,loss@3,{GRAD_NORM}@5",
                         "--out", str(tmp_path / "r"), "--no-log")
    assert code == 0, err
    assert "loss@3" in out and f"{GRAD_NORM}@5" in out
    names = {p.name for p in (tmp_path / "r").iterdir()}
    assert "report_loss_3.png" in names and "report_grad_norm_loss_box_reg_rpn.head.bbox_pred_5.png" in names
    code, _, err = cli("report", EXP, "--uri", uri, "--metric", "loss@zero")
    assert code == 2 and err.count("\n") == 1 and "--metric" in err
