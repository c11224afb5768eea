"""Statistics for comparing configurations across cross-validation splits.

Reference: Nadeau, C. & Bengio, Y. (2003), "Inference for the Generalization Error",
Machine Learning 52:239-281 -- the corrected resampled t-test. It assumes the J splits' scores are
exchangeable and accounts for the overlap of training sets between splits through the
n_test/n_train term added to 1/J; it is an approximation, conservative compared with the naive
t-test (which treats the J scores as independent and is far too eager to call differences real).

Only numpy, pandas and scipy.stats are used here, so the report code can import it without Ray or torch.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

__all__ = [
    "ASSUMPTION",
    "compare_to_best",
    "corrected_interval",
    "corrected_paired_ttest",
    "corrected_variance",
    "holm",
    "holdout_ratio",
    "standing",
]

# One wording shared by the printed table, the kfold report and the README.
ASSUMPTION = (
    "Corrected resampled t-test (Nadeau & Bengio 2003): assumes the splits' scores are exchangeable and "
    "accounts for overlapping training sets via the n_test/n_train term; an approximation, more "
    "conservative than the naive t-test."
)

# Differences this small are floating-point noise on accuracies in [0, 1] (or percent), not signal;
# without a tolerance, d = a - b for "constant" offsets gets a ~1e-34 variance and a meaningless t.
_ZERO_TOL = 1e-12

ArrayLike = Sequence[float] | np.ndarray | pd.Series


def holdout_ratio(k: int) -> float:
    """n_test / n_train for plain K-fold: each split trains on K-1 folds and tests on 1."""
    if k < 2:
        raise ValueError(f"K-fold needs k >= 2, got {k}")
    # Repeated K-fold (R repeats) keeps the same ratio: only J = K*R grows, not the split sizes.
    return 1.0 / (k - 1)


def _finite(values: ArrayLike) -> np.ndarray:
    v = np.asarray(values, dtype=float).ravel()
    return v[np.isfinite(v)]


def corrected_variance(values: ArrayLike, test_train_ratio: float) -> float:
    """(1/J + n_test/n_train) * sample variance (ddof=1) of the J split scores; NaN when J < 2."""
    v = _finite(values)
    if v.size < 2:
        return float("nan")
    return float((1.0 / v.size + test_train_ratio) * np.var(v, ddof=1))


def corrected_interval(accuracies: ArrayLike, test_train_ratio: float,
                       confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): mean +- t_{J-1,(1+confidence)/2} * sqrt(corrected variance).

    J < 2 gives (mean or NaN, NaN, NaN) rather than raising, so a report with a failed fold still prints.
    """
    v = _finite(accuracies)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(v.mean())
    if v.size < 2:
        return mean, float("nan"), float("nan")
    half = stats.t.ppf((1.0 + confidence) / 2.0, v.size - 1) * np.sqrt(corrected_variance(v, test_train_ratio))
    return mean, float(mean - half), float(mean + half)


def corrected_paired_ttest(a: ArrayLike, b: ArrayLike, test_train_ratio: float) -> tuple[float, float, float]:
    """(mean difference a - b, t, two-sided p) over the splits where both a and b have a score.

    a and b must be aligned split by split (same J splits, same order). J < 2 gives NaN t and p.
    """
    a_arr = np.asarray(a, dtype=float).ravel()
    b_arr = np.asarray(b, dtype=float).ravel()
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"paired test needs the same splits: {a_arr.size} vs {b_arr.size} scores")
    d = (a_arr - b_arr)[np.isfinite(a_arr) & np.isfinite(b_arr)]
    j = d.size
    if j == 0:
        return float("nan"), float("nan"), float("nan")
    mean_d = float(d.mean())
    if j < 2:
        return mean_d, float("nan"), float("nan")
    if np.all(np.abs(d - d[0]) <= _ZERO_TOL):
        # No spread: the t statistic is 0/0 or x/0; give the limits instead of NaN so the
        # identical configuration reads "tied" and a constant offset reads "different".
        if abs(mean_d) <= _ZERO_TOL:
            return 0.0, 0.0, 1.0
        return mean_d, float(np.copysign(np.inf, mean_d)), 0.0
    t = mean_d / np.sqrt(corrected_variance(d, test_train_ratio))
    p = 2.0 * stats.t.sf(abs(t), j - 1)
    return mean_d, float(t), float(min(p, 1.0))


def holm(pvalues: ArrayLike) -> np.ndarray:
    """Holm-Bonferroni step-down adjusted p-values, in the input order.

    NaN entries stay NaN and do not count towards the number of tests m.
    """
    # Written here because no dependency provides Holm: statsmodels is not a dependency and
    # scipy.stats.false_discovery_control only offers Benjamini-Hochberg / Benjamini-Yekutieli.
    p = np.asarray(pvalues, dtype=float).ravel()
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = ok.size
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    scaled = (m - np.arange(m)) * p[order]
    # The running maximum makes the adjusted values monotone in the raw p-values (step-down).
    out[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return out


def _fold_word(n: int) -> str:
    return f"{n} successful fold" + ("" if n == 1 else "s")


def compare_to_best(accuracies: pd.DataFrame, test_train_ratio: float, alpha: float = 0.05,
                    min_splits_for_wilcoxon: int = 6, confidence: float = 0.95,
                    contenders: Sequence[bool] | None = None) -> pd.DataFrame:
    """Compare every configuration (row) with the best one over the same splits (columns).

    `accuracies`: index = configuration id, one column per split, NaN where that split failed.
    Returns one row per configuration, sorted by mean_acc descending, with columns n_splits,
    mean_acc, std_acc, ci_low, ci_high, diff_vs_best, p_vs_best, p_holm, p_wilcoxon,
    tied_with_best and reason. The best is the highest mean among configurations with >= 2
    successful splits (if none has 2, the highest mean, and nobody gets p-values).
    Configurations with < 2 successful splits get NaN statistics and a reason, never an error.
    `contenders` (one bool per row): only these may be the best (a race's survivors: a candidate
    dropped early keeps its interval and its test against the best, but cannot win); when none of
    them qualifies, every row may.
    """
    acc = accuracies.astype(float)
    values = acc.to_numpy()
    n_splits = np.isfinite(values).sum(axis=1)

    rows = []
    for i in range(len(acc)):
        mean, low, high = corrected_interval(values[i], test_train_ratio, confidence)
        v = _finite(values[i])
        rows.append({
            "n_splits": int(n_splits[i]),
            "mean_acc": mean,
            "std_acc": float(np.std(v, ddof=1)) if v.size >= 2 else float("nan"),
            "ci_low": low,
            "ci_high": high,
            "diff_vs_best": float("nan"),
            "p_vs_best": float("nan"),
            "p_holm": float("nan"),
            "p_wilcoxon": float("nan"),
            "tied_with_best": pd.NA,
            "reason": "" if n_splits[i] >= 2 else f"{_fold_word(int(n_splits[i]))}: no interval or test",
        })
    out = pd.DataFrame(rows, index=acc.index)

    means = out["mean_acc"].to_numpy()
    eligible = (n_splits >= 2) & np.isfinite(means)
    testable = eligible.any()
    if not testable:
        eligible = np.isfinite(means)
    if eligible.any():
        # First occurrence wins on equal means, so the choice is deterministic in the input order.
        pick = eligible if contenders is None else eligible & np.asarray(contenders, dtype=bool)
        pick = pick if pick.any() else eligible
        best = int(np.flatnonzero(pick)[np.argmax(means[pick])])
        out.iloc[best, out.columns.get_loc("tied_with_best")] = True
        out.iloc[best, out.columns.get_loc("diff_vs_best")] = 0.0
        compared: list[int] = []
        for i in range(len(acc)):
            if i == best:
                continue
            paired = np.isfinite(values[i]) & np.isfinite(values[best])
            d = values[i][paired] - values[best][paired]
            if d.size:
                out.iloc[i, out.columns.get_loc("diff_vs_best")] = float(d.mean())
            if not testable or n_splits[i] < 2:
                continue
            if d.size < 2:
                out.iloc[i, out.columns.get_loc("reason")] = (
                    f"{d.size} fold{'' if d.size == 1 else 's'} shared with the best: no test")
                continue
            _, _, p = corrected_paired_ttest(values[i], values[best], test_train_ratio)
            out.iloc[i, out.columns.get_loc("p_vs_best")] = p
            compared.append(i)
            if d.size >= min_splits_for_wilcoxon:
                out.iloc[i, out.columns.get_loc("p_wilcoxon")] = _wilcoxon_p(d)
        if compared:
            adjusted = holm(out["p_vs_best"].to_numpy()[compared])
            for i, p_adj in zip(compared, adjusted):
                out.iloc[i, out.columns.get_loc("p_holm")] = p_adj
                if np.isfinite(p_adj):
                    out.iloc[i, out.columns.get_loc("tied_with_best")] = bool(p_adj >= alpha)

    out["tied_with_best"] = out["tied_with_best"].astype("boolean")
    out["reason"] = out["reason"].astype(str)
    # The best first (callers take row 0 as the winner), then those with an interval by mean, then
    # the rest (fewer than 2 splits) by mean; a stable sort keeps the input order among equals.
    rank = pd.Series(np.where(eligible, 1, 2), index=out.index)
    if eligible.any():
        rank.iloc[best] = 0
    order = out.assign(_rank=rank).sort_values(["_rank", "mean_acc"], ascending=[True, False], kind="mergesort",
                                                 na_position="last")
    return order.drop(columns="_rank")


def _wilcoxon_p(d: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p on paired differences; 1.0 when they are all zero."""
    if np.all(np.abs(d) <= _ZERO_TOL):
        # scipy raises on an all-zero sample; identical scores are the clearest "no difference".
        return 1.0
    with warnings.catch_warnings():
        # With zeros or ties scipy falls back to the normal approximation and warns once per
        # configuration; that approximation is what we want, the warnings would only flood the report.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.wilcoxon(d).pvalue)


def standing(row) -> str:
    """How a row of compare_to_best stands against the best, in words (printed table, report, plot)."""
    if isinstance(row["reason"], str) and row["reason"]:
        return row["reason"]
    if row["p_vs_best"] != row["p_vs_best"]:          # NaN: the best is not compared with itself
        return "best"
    return "tied with best" if bool(row["tied_with_best"]) else "worse than best (p_holm < 0.05)"
