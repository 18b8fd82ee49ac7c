"""``report.significance`` against statsmodels: Holm adjustment and paired t-test power / sample size."""

from __future__ import annotations

import math

import numpy as np
import pytest
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower

from rcnn_lab.report.significance import holm, paired_power, paired_sd, seeds_needed


@pytest.mark.parametrize("p", [[0.01, 0.04, 0.03], [0.2, 0.001, 0.5, 0.049], [0.3], [0.02, 0.02, 0.9]])
def test_holm_equals_statsmodels(p):
    assert holm(p) == pytest.approx(multipletests(p, method="holm")[1].tolist())


def test_holm_skips_nan_and_keeps_the_order():
    got = holm([math.nan, 0.01, 0.04])
    assert math.isnan(got[0]) and got[1:] == pytest.approx(multipletests([0.01, 0.04], method="holm")[1].tolist())
    assert all(math.isnan(v) for v in holm([math.nan]))


@pytest.mark.parametrize("dz,n", [(0.5, 10), (1.0, 3), (2.5, 4), (0.2, 50)])
def test_paired_power_equals_statsmodels(dz, n):
    assert paired_power(dz, n) == pytest.approx(TTestPower().power(effect_size=dz, nobs=n, alpha=0.05), rel=1e-9)


@pytest.mark.parametrize("delta,sd", [(0.005, 0.004), (0.02, 0.004), (0.001, 0.01), (-0.01, 0.006), (0.05, 0.01)])
def test_seeds_needed_is_the_ceiling_of_statsmodels_solve_power(delta, sd):
    exact = TTestPower().solve_power(effect_size=abs(delta) / sd, alpha=0.05, power=0.8)
    assert seeds_needed(delta, sd) == max(2, math.ceil(exact))


def test_power_where_scipys_noncentral_t_fails_is_integrated():
    # dz 8.08 with 3 seeds: scipy's nct returns NaN (and statsmodels' solve_power then answers 2.000005)
    dz = 0.046666666666666655 / 0.005773502691896262
    assert paired_power(dz, 2) < 0.8 < paired_power(dz, 3) < paired_power(dz, 4)
    assert paired_power(dz, 3) == pytest.approx(0.9995, abs=5e-4)
    assert seeds_needed(0.046666666666666655, 0.005773502691896262) == 3
    # the integral agrees with the noncentral t where scipy manages
    from scipy import stats

    from rcnn_lab.report.significance import _power_by_integration

    crit = stats.t.ppf(0.975, 9)
    assert _power_by_integration(crit, 9, 2.0) == pytest.approx(paired_power(2.0 / 10 ** 0.5, 10), rel=1e-7)


def test_seeds_needed_edge_cases_and_paired_sd():
    import pandas as pd

    assert math.isnan(seeds_needed(0.0, 0.1)) and math.isnan(seeds_needed(0.01, math.nan))
    assert seeds_needed(0.01, 0.0) == 2 and seeds_needed(1e-6, 1.0) == math.inf
    a, b = pd.Series([0.5, 0.52, 0.49], index=[0, 1, 2]), pd.Series([0.48, 0.5, 0.5, 0.7], index=[0, 1, 2, 3])
    assert paired_sd(a, b) == pytest.approx(np.std([0.02, 0.02, -0.01], ddof=1))
    assert math.isnan(paired_sd(a.iloc[:1], b))
