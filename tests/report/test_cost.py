"""``report.cost``: the Pareto front and the cost-vs-metric scatter."""

from __future__ import annotations

import numpy as np
import pytest

from rcnn_lab.report.cost import pareto_front, plot_cost
from tests.report.test_stats import EXP, PNG, df  # noqa: F401  (module fixture; uri: conftest)


def test_pareto_front_keeps_the_undominated_points():
    cost = np.array([1.0, 2.0, 2.0, 3.0, 4.0, np.nan])
    score = np.array([0.3, 0.5, 0.4, 0.45, 0.6, 0.9])
    assert pareto_front(cost, score).tolist() == [True, True, False, False, True, False]
    # throughput: higher is cheaper
    assert pareto_front(np.array([10.0, 20.0, 5.0]), np.array([0.5, 0.4, 0.6]), higher_is_cheaper=True).tolist() == [
        True, True, True]
    assert pareto_front(np.array([10.0, 20.0]), np.array([0.5, 0.6]), higher_is_cheaper=True).tolist() == [False, True]


def test_plot_cost_writes_a_png_only_when_the_cost_was_logged(df, tmp_path):  # noqa: F811
    from rcnn_lab.errors import ConfigError
    from rcnn_lab.report import summary

    table = summary(df[df["experiment"] == EXP])
    assert plot_cost(table, "bbox_AP", tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
    table["gflops_mean"] = [10.0, 8.0, 12.0]
    assert plot_cost(table, "bbox_AP", tmp_path / "c.png").read_bytes()[:8] == PNG
    assert plot_cost(table, "segm_AP", tmp_path / "t.png", cost="train_time_s").read_bytes()[:8] == PNG
    with pytest.raises(ConfigError, match="--cost: unknown cost 'flops'; did you mean 'gflops'"):
        plot_cost(table, "bbox_AP", tmp_path / "x.png", cost="flops")
