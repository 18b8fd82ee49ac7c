"""``rcnn_lab.report.summary`` and plots, checked against numpy/scipy on the values logged by ``test_data.build_store``."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from tests.report.test_data import BATCH, BOX, EXP, EXP2, ITERATIONS, KEY, VARIANTS, VARIANTS2

PNG = b"\x89PNG\r\n\x1a\n"
pytestmark = pytest.mark.filterwarnings("ignore:.*noload.*:DeprecationWarning")  # inside MLflow's sqlalchemy store


@pytest.fixture(scope="module")
def df(uri):
    from rcnn_lab.report import runs

    return runs([EXP, EXP2], tracking_uri=uri)


def expected(values: list[float], confidence: float = 0.95) -> dict[str, float]:
    x = np.asarray(values)
    n = len(x)
    if n < 2:
        return {"mean": x.mean(), "std": math.nan, "n": n, "ci_low": math.nan, "ci_high": math.nan}
    low, high = stats.t.interval(confidence, n - 1, loc=x.mean(), scale=stats.sem(x))
    return {"mean": x.mean(), "std": x.std(ddof=1), "n": n, "ci_low": low, "ci_high": high}


def check(row, metric: str, values: list[float], confidence: float = 0.95) -> None:
    for stat, value in expected(values, confidence).items():
        got = row[f"{metric}_{stat}"]
        assert (math.isnan(got) and math.isnan(value)) or got == pytest.approx(value, rel=1e-9), (metric, stat)


def test_per_variant_statistics_use_latest_finished_runs_only(df):
    from rcnn_lab.report import summary

    table = summary(df[df["experiment"] == EXP])
    assert table["variant"].tolist() == ["base", "low", "conv"]
    assert table["baseline"].tolist() == [True, False, False]
    rows = table.set_index("variant")
    base_bbox, base_segm = VARIANTS["base"][3], VARIANTS["base"][4]
    for variant, (_, _, _, bbox, segm, times) in VARIANTS.items():
        row = rows.loc[variant]
        check(row, "bbox_AP", bbox)  # the old duplicate (0.10) and the failed/running runs are not in here
        check(row, "segm_AP", segm)
        assert row["bbox_AP_delta"] == pytest.approx(np.mean(bbox) - np.mean(base_bbox))
        assert row["segm_AP_delta"] == pytest.approx(np.mean(segm) - np.mean(base_segm))
        if variant == "base":
            assert math.isnan(row["bbox_AP_p"]) and row["bbox_AP_delta"] == 0
        else:
            assert row["bbox_AP_p"] == pytest.approx(stats.ttest_rel(bbox, base_bbox).pvalue)
            assert row["segm_AP_p"] == pytest.approx(stats.ttest_rel(segm, base_segm).pvalue)
        assert row["train_time_s_mean"] == pytest.approx(np.mean(times))
        assert row["images_per_s_mean"] == pytest.approx(np.mean([ITERATIONS * BATCH / t for t in times]))
        assert row["finished"] == 3
    assert rows["eval_images_per_s_mean"].tolist() == pytest.approx([11.0, 21.0, 31.0])
    assert rows[["failed", "running", "killed"]].to_dict("list") == {"failed": [0, 1, 0], "running": [0, 0, 1], "killed": [1, 0, 0]}
    assert rows["changed"].tolist() == ["", f"{KEY}=150", f"{BOX}=conv4"]
    assert rows[KEY].tolist() == [600, 150, 600] and rows[BOX].tolist() == ["two_mlp", "two_mlp", "conv4"]


def test_group_by_config_key_pools_variants_and_pairs_seed_means(df):
    from rcnn_lab.report import summary

    table = summary(df[df["experiment"] == EXP], metrics=["bbox_AP"], group_by=KEY)
    assert table[KEY].tolist() == [150, 600] and table["baseline"].tolist() == [False, True]
    low, pooled = table.iloc[0], table.iloc[1]
    base, conv = VARIANTS["base"][3], VARIANTS["conv"][3]
    check(pooled, "bbox_AP", base + conv)
    check(low, "bbox_AP", VARIANTS["low"][3])
    seed_means = [(b + c) / 2 for b, c in zip(base, conv)]
    assert low["bbox_AP_p"] == pytest.approx(stats.ttest_rel(VARIANTS["low"][3], seed_means).pvalue)
    assert low["bbox_AP_delta"] == pytest.approx(np.mean(VARIANTS["low"][3]) - np.mean(base + conv))
    assert (low["variants"], pooled["variants"]) == (1, 2)
    assert (low["failed"], pooled["running"], pooled["finished"]) == (1, 1, 6)
    assert "segm_AP_mean" not in table.columns

    by_box = summary(df[df["experiment"] == EXP], metrics=["segm_AP"], group_by=BOX, baseline="conv4", confidence=0.9)
    assert by_box[BOX].tolist() == ["conv4", "two_mlp"] and by_box["baseline"].tolist() == [True, False]
    check(by_box.iloc[1], "segm_AP", VARIANTS["base"][4] + VARIANTS["low"][4], confidence=0.9)


def test_baseline_argument_and_combined_experiments(df):
    from rcnn_lab.report import summary

    table = summary(df, metrics=["bbox_AP"], baseline=None)
    assert table["experiment"].tolist() == [EXP] * 3 + [EXP2] * 2
    other2 = table[table["variant"] == "other2"].iloc[0]
    check(other2, "bbox_AP", VARIANTS2["other2"][1])  # one seed: no std, no interval, no test
    assert math.isnan(other2["bbox_AP_p"])
    assert other2["bbox_AP_delta"] == pytest.approx(0.55 - np.mean(VARIANTS2["base2"][1]))

    vs_conv = summary(df[df["experiment"] == EXP], metrics=["bbox_AP"], baseline="conv").set_index("variant")
    conv = VARIANTS["conv"][3]
    assert vs_conv["baseline"].tolist() == [False, False, True]
    assert vs_conv.loc["base", "bbox_AP_delta"] == pytest.approx(np.mean(VARIANTS["base"][3]) - np.mean(conv))
    assert vs_conv.loc["low", "bbox_AP_p"] == pytest.approx(stats.ttest_rel(VARIANTS["low"][3], conv).pvalue)


def test_bad_metric_group_by_and_baseline_name_the_flag_and_closest_match(df):
    from rcnn_lab.errors import ConfigError
    from rcnn_lab.report import summary

    with pytest.raises(ConfigError, match=r"--metric: unknown metric 'segm_APP'; did you mean 'segm_AP'\? \(available: .*bbox_AP50"):
        summary(df, metrics=["segm_APP"])
    with pytest.raises(ConfigError, match=f"--group-by: unknown config key 'model.rpn.pre_nms_top_n.trian'; did you mean '{KEY}'"):
        summary(df, group_by="model.rpn.pre_nms_top_n.trian")
    with pytest.raises(ConfigError, match="--baseline: no variant 'bsae' in experiment 'abl'; did you mean 'base'"):
        summary(df[df["experiment"] == EXP], baseline="bsae")
    with pytest.raises(ConfigError, match="no rcnn-lab runs"):
        summary(df.iloc[:0])


def test_describe_and_paired_p_edge_cases():
    import pandas as pd

    from rcnn_lab.report import describe, paired_p

    d = describe([1.0, 2.0, float("nan"), 4.0], confidence=0.9)
    assert d["n"] == 3 and d["mean"] == pytest.approx(7 / 3)
    assert (d["ci_low"], d["ci_high"]) == pytest.approx(stats.t.interval(0.9, 2, loc=7 / 3, scale=stats.sem([1, 2, 4])))
    assert math.isnan(describe([])["mean"]) and math.isnan(describe([1.0])["std"])
    a, b = pd.Series({0: 1.0, 1: 2.0, 5: 3.0}), pd.Series({0: 1.5, 1: 2.1, 2: 9.0})
    assert paired_p(a, b) == pytest.approx(stats.ttest_rel([1.0, 2.0], [1.5, 2.1]).pvalue)  # seeds 0 and 1 only
    assert math.isnan(paired_p(a, pd.Series({0: 1.0})))
    assert math.isnan(paired_p(a, a))  # no differences at all: undefined (and no warning)


def test_plots_write_pngs(df, uri, tmp_path):
    from rcnn_lab.errors import ConfigError
    from rcnn_lab.report import plot_grid, plot_losses, plot_metric, summary
    from rcnn_lab.report.plots import loss_histories

    table = summary(df)
    for path in (plot_metric(table, "segm_AP", tmp_path / "m.png"),
                 plot_grid(table, "bbox_AP", KEY, tmp_path / "g.png"),
                 plot_grid(summary(df, group_by=BOX), "segm_AP", BOX, tmp_path / "b.png"),
                 plot_losses(df, tmp_path / "l.png", uri),
                 plot_losses(df, tmp_path / "r.png", per_run=True, smooth=3)):
        assert path.read_bytes()[:8] == PNG
    histories = loss_histories(df[df["experiment"] == EXP])
    assert len(histories) == 9 and all(s.index.tolist() == list(range(1, 11)) for s in histories.values())
    with pytest.raises(ConfigError, match="did you mean 'segm_AP'"):
        plot_metric(table, "segm_ap", tmp_path / "x.png")
    assert plot_losses(df.iloc[:0], tmp_path / "none.png", uri) is None and not (tmp_path / "none.png").exists()


def test_render_formats(df):
    import json

    from rcnn_lab.report import render, summary

    table = summary(df[df["experiment"] == EXP], metrics=["bbox_AP"])
    md = render(table, "md").splitlines()
    assert md[0].startswith("| variant") and "Δ bbox_AP" in md[0] and "p bbox_AP" in md[0]
    assert set(md[1]) <= {"|", "-", ":"} and len(md) == 2 + 3
    assert md[2].split("|")[1].strip() == "base (baseline)" and f"{np.mean(VARIANTS['base'][3]):.3f} ±" in md[2]
    records = json.loads(render(table, "json"))
    assert [r["variant"] for r in records] == ["base", "low", "conv"] and records[0]["bbox_AP_p"] is None
    csv = render(table, "csv").splitlines()
    assert csv[0].startswith("experiment,variant,baseline,changed") and len(csv) == 4
    assert "<table" in render(table, "html")


def test_holm_adjusted_p_and_seeds_needed_from_the_paired_differences(df):
    from statsmodels.stats.multitest import multipletests

    from rcnn_lab.report import render, seeds_needed, summary

    table = summary(df[df["experiment"] == EXP], metrics=["bbox_AP"], mde=1.0)
    rows = table.set_index("variant")
    raw = [rows.loc[v, "bbox_AP_p"] for v in ("low", "conv")]
    assert [rows.loc[v, "bbox_AP_p_holm"] for v in ("low", "conv")] == pytest.approx(multipletests(raw, method="holm")[1])
    assert math.isnan(rows.loc["base", "bbox_AP_p_holm"]) and math.isnan(rows.loc["base", "bbox_AP_seeds"])
    base = np.asarray(VARIANTS["base"][3])
    for variant in ("low", "conv"):
        d = np.asarray(VARIANTS[variant][3]) - base
        for column, effect in (("bbox_AP_seeds", d.mean()), ("bbox_AP_seeds_mde", 0.01)):  # formula: test_significance
            assert rows.loc[variant, column] == seeds_needed(effect, d.std(ddof=1)), (variant, column)
    assert rows.loc["low", "bbox_AP_seeds"] == 3 and rows.loc["low", "bbox_AP_seeds_mde"] > 3
    header = render(table, "md").splitlines()[0]
    assert "p Holm bbox_AP" in header and "seeds for Δ bbox_AP" in header and "seeds for 1 pt bbox_AP" in header
    one = summary(df[(df["experiment"] == EXP) & (df["variant"] != "conv")], metrics=["bbox_AP"])
    assert "p Holm" not in render(one, "md")  # a single comparison needs no adjustment


def test_keys_every_variant_shares_are_shown_once_above_the_table(df):
    from rcnn_lab.errors import ConfigError
    from rcnn_lab.report import render, summary

    mine = df[df["experiment"] == EXP].copy()
    mine["changed"] = [{**c, "train.iterations": 60, "data.train.num_images": 80} for c in mine["changed"]]
    mine["overrides"] = [{"train.iterations": 60}] * len(mine)
    table = summary(mine, metrics=["bbox_AP"])
    assert table.attrs["shared"] == {EXP: {"train.iterations": 60, "data.train.num_images": 80}}
    assert table["changed"].tolist() == ["", f"{KEY}=150", f"{BOX}=conv4"]
    assert table.attrs["changed_keys"] == [KEY, BOX]
    md = render(table, "md").splitlines()
    assert md[0] == f"Same in every variant of {EXP}: train.iterations=60 (--set), data.train.num_images=80"
    assert md[1] == "" and md[2].startswith("| variant") and "train.iterations" not in "\n".join(md[2:])
    assert render(table, "html").startswith(f"<p>Same in every variant of {EXP}: train.iterations=60 (--set)")
    with pytest.raises(ConfigError, match="--mde: must be a positive number of AP points"):
        summary(mine, mde=0)


def test_report_warns_when_averaged_runs_differ_in_threads_or_device():
    import pandas as pd

    from rcnn_lab.report.stats import mixed_environments

    def frame(threads, devices, experiment="e"):
        n = len(threads)
        return pd.DataFrame({
            "experiment": experiment, "variant": ["a", "a", "b", "b"][:n], "seed": [0, 1, 0, 1][:n],
            "status": "FINISHED", "start_time": list(range(n)), "device": devices,
            "threads": pd.array(threads, dtype="Int64"),
        })

    assert mixed_environments(frame([2, 2, 2, 2], ["cpu"] * 4)) == []
    (line,) = mixed_environments(frame([1, 1, 2, 2], ["cpu"] * 4))  # --parallel 2 for a, plain for b
    assert "runs of 'e' differ in CPU thread counts (1, 2)" in line and "OMP_NUM_THREADS" in line
    (line,) = mixed_environments(frame([2, 2, 2, 2], ["cpu", "cpu", "cuda", "cuda"]))
    assert "devices (cpu, cuda)" in line
    old = frame([None, None, 2, 2], ["cpu"] * 4)  # runs logged before the tag: not a mismatch
    assert mixed_environments(old) == []
    both = pd.concat([frame([1, 1, 1, 1], ["cpu"] * 4, "x"), frame([2, 2, 2, 2], ["cpu"] * 4, "y")])
    assert mixed_environments(both) == []  # different experiments are never averaged together
