"""Statistics for many variants: Holm-adjusted p-values and how many seeds a difference needs.

**Holm** (step-down Bonferroni; ``statsmodels.stats.multitest.multipletests(method="holm")``). With
``m`` variants compared with the baseline and their paired p-values sorted ``p(1) <= ... <= p(m)``::

    p_holm(i) = min(1, max_{j <= i} (m - j + 1) * p(j))

It keeps the chance of any false "significant" among the ``m`` comparisons at alpha, where the raw
p-values keep it per comparison only.

**Seeds needed** (power of the paired t-test; ``statsmodels.stats.power.TTestPower``). Seed ``s`` of a
variant and of the baseline form a pair; ``d_s`` is their difference, ``sd`` the sample standard
deviation of the ``d_s`` (ddof=1). For an effect ``delta`` the standardised effect is
``dz = |delta| / sd``; with ``n`` seeds the two-sided test at level alpha rejects when ``|T| >
t_{1-alpha/2, n-1}``, and ``T`` follows a noncentral t with ``n - 1`` degrees of freedom and
noncentrality ``dz * sqrt(n)``, so::

    power(n) = P(T' > t_{1-alpha/2, n-1}) + P(T' < -t_{1-alpha/2, n-1}),   T' ~ nct(n - 1, dz * sqrt(n))

"Seeds needed" is the smallest ``n >= 2`` with ``power(n) >= 0.8`` (alpha 0.05): for the observed
delta (``m_seeds``) and for a minimum detectable effect given in AP points (``--mde 1`` is 0.01 AP;
``m_seeds_mde``). It needs at least two paired seeds to estimate ``sd``; a result above the seeds run
says those seeds cannot tell the difference from noise reliably.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

ALPHA = 0.05
POWER = 0.8
MAX_SEEDS = 10_000


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the input order; NaN entries stay NaN and do not count in ``m``."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(len(p), np.nan)
    idx = np.flatnonzero(~np.isnan(p))
    m = len(idx)
    if m == 0:
        return out.tolist()
    order = idx[np.argsort(p[idx], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def paired_power(dz: float, n: int, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test with ``n`` pairs for standardised effect ``dz``."""
    from scipy import stats

    df = n - 1
    crit = stats.t.ppf(1 - alpha / 2, df)
    nc = abs(dz) * math.sqrt(n)
    power = float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))
    if math.isnan(power):  # scipy's nct fails for large noncentrality at few degrees of freedom: integrate instead
        power = _power_by_integration(crit, df, nc)
    return power


def _power_by_integration(crit: float, df: int, nc: float) -> float:
    """``P(|Z + nc| > crit * sqrt(V / df))`` with ``Z`` standard normal and ``V`` chi-square(df), by quadrature over V."""
    from scipy import integrate, stats

    def tails(v: float) -> float:
        edge = crit * math.sqrt(v / df)
        return (stats.norm.sf(edge - nc) + stats.norm.cdf(-edge - nc)) * stats.chi2.pdf(v, df)

    return float(integrate.quad(tails, 0, math.inf, limit=200)[0])


def seeds_needed(delta: float, sd: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """Smallest number of paired seeds (>= 2) whose paired t-test detects ``delta`` with ``power``.

    ``sd``: standard deviation of the per-seed differences. NaN when it is unknown (fewer than two
    pairs) or ``delta`` is 0 or NaN; 2 when ``sd`` is 0 (no noise); ``inf`` beyond ``MAX_SEEDS``.
    """
    if any(v is None or math.isnan(v) for v in (delta, sd)) or delta == 0:
        return math.nan
    if sd == 0:
        return 2.0
    dz = abs(delta) / sd
    lo, hi = 2, 2
    while paired_power(dz, hi, alpha) < power:  # exponential search, then bisection (power grows with n)
        lo, hi = hi + 1, hi * 2
        if hi > MAX_SEEDS:
            return math.inf
    while lo < hi:
        mid = (lo + hi) // 2
        if paired_power(dz, mid, alpha) >= power:
            hi = mid
        else:
            lo = mid + 1
    return float(hi)


def paired_sd(values, reference) -> float:
    """Sample standard deviation (ddof=1) of the per-seed differences of two seed-indexed Series; NaN below 2 pairs."""
    import pandas as pd

    both = pd.concat([values.rename("a"), reference.rename("b")], axis=1, join="inner").dropna()
    if len(both) < 2:
        return math.nan
    return float((both["a"] - both["b"]).std(ddof=1))
