"""``report.sweep_summary``: the metrics and description a sweep run carries, from the runner's outcomes."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats

from rcnn_lab.report.sweep_summary import metric_key, summarize

EXP = SimpleNamespace(name="abl", tracking_name="abl")
BOX = {"base": [0.30, 0.32, 0.31], "low": [0.25, 0.28, 0.26]}
SEGM = {"base": [0.28, 0.30, 0.29], "low": [0.22, 0.25, 0.21]}


def _outcome(variant: str, seed: int, status: str = "FINISHED", **metrics):
    v = SimpleNamespace(name=variant, baseline=variant == "base", changed={} if variant == "base" else {"model.x": 1})
    run = SimpleNamespace(variant=v, seed=seed, hash=f"h-{variant}-{seed}")
    return SimpleNamespace(run=run, status=status, metrics=metrics, run_id=f"r-{variant}-{seed}", error=None)


def _finished(variant: str, seed: int, status: str = "FINISHED"):
    return _outcome(variant, seed, status, bbox_AP=BOX[variant][seed], segm_AP=SEGM[variant][seed],
                    bbox_AP50=BOX[variant][seed] + 0.2, segm_AP50=SEGM[variant][seed] + 0.2, bbox_APl=-1.0)


def test_per_variant_means_and_intervals_named_metric_slash_variant():
    outcomes = [_finished(v, s, "SKIPPED" if s == 0 else "FINISHED") for v in ("base", "low") for s in range(3)]
    metrics, _ = summarize(EXP, outcomes, 6)
    for v in ("base", "low"):
        x = np.asarray(BOX[v])
        low, high = stats.t.interval(0.95, 2, loc=x.mean(), scale=stats.sem(x))
        assert metrics[f"bbox_AP/{v}"] == pytest.approx(x.mean())
        assert metrics[f"bbox_AP/{v} ci_low"] == pytest.approx(low) and metrics[f"bbox_AP/{v} ci_high"] == pytest.approx(high)
        assert metrics[f"segm_AP50/{v}"] == pytest.approx(np.mean(SEGM[v]) + 0.2)
    assert set(metrics) == {metric_key(m, v, s) for m in ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50")
                            for v in ("base", "low") for s in ("", "ci_low", "ci_high")}  # headline metrics only


def test_the_description_is_the_report_table_with_deltas_and_paired_p_values_as_runs_finish():
    outcomes = [_finished("base", 0), _finished("low", 0), _finished("base", 1), _finished("low", 1)]
    outcomes.append(_outcome("low", 2, "FAILED"))
    _, note = summarize(EXP, outcomes, 6)
    assert re.match(r"\*\*abl\*\*: 4 of 6 runs finished or found finished \(updated \d{4}-\d\d-\d\d ", note)
    header = next(line for line in note.splitlines() if line.startswith("| variant"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells[:4] == ["variant", "changed", "runs", "failed"] and "Δ bbox_AP" in cells and "p segm_AP" in cells
    assert not any(c.startswith(("bbox_AP50", "seeds for")) for c in cells)  # two metrics keep the note readable
    low = next(line for line in note.splitlines() if line.startswith("| low"))
    row = dict(zip(cells, (c.strip() for c in low.strip("|").split("|"))))
    delta = np.mean(BOX["low"][:2]) - np.mean(BOX["base"][:2])
    p = stats.ttest_rel(BOX["low"][:2], BOX["base"][:2]).pvalue
    assert row["runs"] == "2" and row["failed"] == "1"
    assert row["Δ bbox_AP"] == f"{delta:+.3f}" and row["p bbox_AP"] == f"{p:.3f}"
    assert "p: paired t-test over the seeds both have" in note


def test_nothing_finished_yet_and_one_variant_say_so():
    metrics, note = summarize(EXP, [_outcome("base", 0, "FAILED")], 2)
    assert metrics == {} and note.endswith("No run has finished yet.") and "0 of 2 runs" in note
    metrics, note = summarize(EXP, [_finished("base", 0), _finished("base", 1)], 2)
    assert "nothing to compare" in note and "Δ" not in note
    assert not any(math.isnan(v) for v in metrics.values())


def test_metric_keys_keep_only_characters_mlflow_accepts():
    assert metric_key("segm_AP", "base/lr=0.01", "ci_low") == "segm_AP/base/lr:0.01 ci_low"
    assert metric_key("bbox_AP", "a+b (x)") == "bbox_AP/a_b _x_"
