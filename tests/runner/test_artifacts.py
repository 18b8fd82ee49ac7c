"""``runner.artifacts``: the loss-curve figure a run stores (``loss_curve.png``)."""

from __future__ import annotations

import math

import pytest

from rcnn_lab.runner.artifacts import ema, loss_curve


def test_ema_is_bias_corrected_like_tensorboards_smoothing():
    assert ema([4.0]) == [4.0]  # not pulled towards 0 at the start
    values = [1.0, 3.0, 2.0, 8.0]
    avg, expected = 0.0, []
    for i, v in enumerate(values, 1):
        avg = 0.6 * avg + 0.4 * v
        expected.append(avg / (1 - 0.6 ** i))
    assert ema(values, 0.6) == pytest.approx(expected)
    assert ema([2.0] * 5, 0.9) == pytest.approx([2.0] * 5)


def test_loss_curve_is_titled_with_the_run_smoothed_over_faint_raw_values_on_a_log_scale_with_the_legend_outside():
    import matplotlib.pyplot as plt

    history = [{"iteration": i, "loss_mask": 1.0 / i + (0.3 if i % 2 else 0.0), "loss_classifier": 0.0 if i == 3 else 0.5,
                "total": 2.0 / i} for i in range(1, 21)]
    fig = loss_curve(history, "wide s1 (abl)")
    try:
        (ax,) = fig.axes
        assert ax.get_title().splitlines()[0] == "wide s1 (abl)" and "EMA 0.9" in ax.get_title()
        assert ax.get_yscale() == "log"
        lines = ax.get_lines()
        raw = [ln for ln in lines if ln.get_alpha() is not None and ln.get_alpha() < 0.5]
        smooth = [ln for ln in lines if ln.get_label() in ("loss_mask", "loss_classifier", "total")]
        assert len(raw) == len(smooth) == 3  # each loss twice: raw (faint) and smoothed (labelled)
        mask = next(ln for ln in smooth if ln.get_label() == "loss_mask")
        assert list(mask.get_ydata()) == pytest.approx(ema([h["loss_mask"] for h in history]))
        assert all(min(ln.get_ydata()) > 0 for ln in raw)  # a zero loss is kept on the log scale
        legend = ax.get_legend()
        fig.canvas.draw()
        assert legend.get_window_extent().x0 >= ax.get_window_extent().x1  # right of the curves, not over them
        assert not math.isnan(sum(mask.get_ydata()))
    finally:
        plt.close(fig)
