"""tune_cifar.core.stats against numbers computed by hand here (numpy arithmetic, scipy.stats.t only for the
distribution). Imported as a module: a bare `holdout_ratio` in this namespace would be collected
by pytest as a test."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from tune_cifar.core import stats

RATIO = 0.5  # K=3: each split trains on 2 folds, tests on 1
J = 6  # K=3 folds x R=2 repeats
T975 = sps.t.ppf(0.975, J - 1)

BEST = [0.80, 0.82, 0.78, 0.81, 0.79, 0.80]
TIED = [0.79, 0.83, 0.77, 0.80, 0.80, 0.79]  # +-1 point around BEST, no consistent direction
LOSER = [0.70, 0.715, 0.69, 0.725, 0.68, 0.705]  # 8.5..11 points below BEST on every split, all distinct
SINGLE = [0.85, np.nan, np.nan, np.nan, np.nan, np.nan]  # higher mean, but only one split survived


def table(n_splits: int = J) -> pd.DataFrame:
    rows = {"best": BEST, "tied": TIED, "loser": LOSER, "single": SINGLE}
    cols = [f"r{r}f{f}" for r in range(2) for f in range(3)][:n_splits]
    return pd.DataFrame({k: v[:n_splits] for k, v in rows.items()}, index=cols).T


def hand_paired(a, b):
    """Corrected resampled paired t-test written out: d_j = a_j - b_j, t, two-sided p with J-1 df."""
    d = np.array(a, float) - np.array(b, float)
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1)
    t = mean / math.sqrt((1 / n + RATIO) * var)
    return mean, 2 * sps.t.sf(abs(t), n - 1)


def test_compare_to_best_against_hand_computation():
    res = stats.compare_to_best(table(), RATIO)

    assert list(res.columns) == ["n_splits", "mean_acc", "std_acc", "ci_low", "ci_high", "diff_vs_best",
                                 "p_vs_best", "p_holm", "p_wilcoxon", "tied_with_best", "reason"]
    # The best first (callers take row 0 as the winner), then by mean; the 1-split config's higher 0.85
    # cannot be "the best" and goes after every configuration with an interval.
    assert list(res.index) == ["best", "tied", "loser", "single"]

    # The best's own statistics.
    m = sum(BEST) / J
    s2 = sum((x - m) ** 2 for x in BEST) / (J - 1)
    half = T975 * math.sqrt((1 / J + RATIO) * s2)
    b = res.loc["best"]
    assert b.n_splits == J
    assert b.mean_acc == pytest.approx(m)
    assert b.std_acc == pytest.approx(math.sqrt(s2))
    assert (b.ci_low, b.ci_high) == (pytest.approx(m - half), pytest.approx(m + half))
    assert b.diff_vs_best == 0 and np.isnan(b.p_vs_best) and np.isnan(b.p_holm) and np.isnan(b.p_wilcoxon)
    assert bool(b.tied_with_best) is True
    assert b.reason == ""

    d_tied, p_tied = hand_paired(TIED, BEST)
    d_loser, p_loser = hand_paired(LOSER, BEST)
    # Holm with m = 2: the smaller p times 2, the larger times 1, kept monotone, clipped at 1.
    lo, hi = sorted([p_tied, p_loser])
    holm_lo, holm_hi = min(2 * lo, 1.0), min(max(2 * lo, hi), 1.0)
    holm_tied = holm_lo if p_tied == lo else holm_hi
    holm_loser = holm_lo if p_loser == lo else holm_hi

    t = res.loc["tied"]
    assert t.diff_vs_best == pytest.approx(d_tied)
    assert t.p_vs_best == pytest.approx(p_tied)
    assert t.p_holm == pytest.approx(holm_tied)
    assert t.p_holm >= 0.05 and bool(t.tied_with_best) is True
    assert 0 < t.p_wilcoxon <= 1

    lz = res.loc["loser"]
    assert lz.diff_vs_best == pytest.approx(d_loser)
    assert d_loser == pytest.approx(-0.0975)  # (10+10.5+9+8.5+11+9.5)/6 points
    assert lz.p_vs_best == pytest.approx(p_loser)
    assert lz.p_holm == pytest.approx(holm_loser)
    assert lz.p_holm < 0.05 and bool(lz.tied_with_best) is False
    # Six differences, all negative, no ties: exact two-sided signed-rank p = 2 / 2**6.
    assert lz.p_wilcoxon == pytest.approx(2 / 2 ** 6)

    s = res.loc["single"]
    assert s.n_splits == 1 and s.mean_acc == pytest.approx(0.85)
    for col in ["std_acc", "ci_low", "ci_high", "p_vs_best", "p_holm", "p_wilcoxon"]:
        assert np.isnan(s[col]), col
    assert s.diff_vs_best == pytest.approx(0.85 - 0.80)  # its one split paired with the best's
    assert pd.isna(s.tied_with_best)
    assert isinstance(s.reason, str) and "1 successful fold" in s.reason and "nan" not in s.reason.lower()
    assert all(isinstance(r, str) and "nan" not in r.lower() for r in res.reason)


def test_wilcoxon_only_from_min_splits():
    five = stats.compare_to_best(table(5), RATIO)
    assert five.loc[["tied", "loser"], "p_wilcoxon"].isna().all()
    assert five.loc[["tied", "loser"], "p_vs_best"].notna().all()  # the t-test still runs at J = 5
    six = stats.compare_to_best(table(6), RATIO)
    assert six.loc[["tied", "loser"], "p_wilcoxon"].notna().all()


def test_no_config_with_two_splits_gets_no_pvalues():
    acc = pd.DataFrame({"s0": [0.7, np.nan], "s1": [np.nan, 0.8]}, index=["a", "b"])
    res = stats.compare_to_best(acc, RATIO)
    assert list(res.index) == ["b", "a"]
    assert bool(res.loc["b", "tied_with_best"]) is True
    assert res[["p_vs_best", "p_holm", "p_wilcoxon", "ci_low", "ci_high"]].isna().all().all()
    assert (res.reason != "").all()


def test_identical_configs_are_tied():
    acc = pd.DataFrame([BEST, BEST], index=["a", "b"])
    res = stats.compare_to_best(acc, RATIO)
    assert res.loc["b", "p_vs_best"] == 1.0 and res.loc["b", "p_wilcoxon"] == 1.0
    assert bool(res.loc["b", "tied_with_best"]) is True


def test_holm_known_example_and_nan():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> max(0.06, 0.04) = 0.06
    np.testing.assert_allclose(stats.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    # NaN passes through and m = 2: 0.01*2 = 0.02, max(0.02, 0.04*1) = 0.04
    out = stats.holm([0.04, np.nan, 0.01])
    assert np.isnan(out[1])
    np.testing.assert_allclose(out[[0, 2]], [0.04, 0.02])
    np.testing.assert_allclose(stats.holm([0.6, 0.9]), [1.0, 1.0])  # clipped at 1
    assert stats.holm([]).size == 0 and np.isnan(stats.holm([np.nan])).all()


def test_interval():
    mean, low, high = stats.corrected_interval(BEST, RATIO)
    assert low < mean < high
    m = sum(BEST) / J
    s = math.sqrt(sum((x - m) ** 2 for x in BEST) / (J - 1))
    naive_half = T975 * s / math.sqrt(J)
    assert high - low > 2 * naive_half
    assert stats.corrected_variance(BEST, RATIO) == pytest.approx((1 / J + RATIO) * s ** 2)

    one = stats.corrected_interval([0.8], RATIO)
    assert one[0] == pytest.approx(0.8) and np.isnan(one[1]) and np.isnan(one[2])
    assert all(np.isnan(x) for x in stats.corrected_interval([], RATIO))


def test_paired_ttest_edge_cases():
    a = [0.80, 0.70, 0.90]
    assert stats.corrected_paired_ttest(a, a, RATIO) == (0.0, 0.0, 1.0)
    # A constant offset (up to float rounding): zero variance, nonzero mean.
    diff, t, p = stats.corrected_paired_ttest(a, [x - 0.05 for x in a], RATIO)
    assert diff == pytest.approx(0.05) and t == math.inf and p == 0.0
    diff, t, p = stats.corrected_paired_ttest([x - 0.05 for x in a], a, RATIO)
    assert t == -math.inf and p == 0.0
    diff, t, p = stats.corrected_paired_ttest([0.8, np.nan], [0.7, 0.7], RATIO)
    assert diff == pytest.approx(0.1) and np.isnan(t) and np.isnan(p)


def test_holdout_ratio():
    assert stats.holdout_ratio(3) == pytest.approx(0.5)
    assert stats.holdout_ratio(5) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        stats.holdout_ratio(1)
