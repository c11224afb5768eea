"""Racing over cross-validation splits: which candidates go on to the next split.

Candidates run split by split. From split `min_splits` on, after every split, each surviving candidate
is compared with the survivor of the highest mean by the corrected resampled paired t-test of
stats.py (the same formula, over the splits both have), one-sided (is it worse?); the p-values of
that round are Holm-adjusted together, and a candidate whose adjusted p is below `alpha` is dropped.
The best is never dropped, so the winner runs every split. No decision follows the last split
(nothing is left to save there). Racing in the spirit of F-race / the
"early stopping cross-validation" of Bergman, Purucker & Hutter (AutoML 2024), decided with the
variance-corrected test instead of a naive one.

The decision is a pure function of the table of split scores (and which splits have finished), so the
racing searcher (tuning/racing.py), a --resume and the result files all replay the same race from the
same table. numpy / pandas / scipy only: no Ray, no torch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .stats import corrected_paired_ttest, holm

__all__ = ["DEFAULT_ALPHA", "DEFAULT_MIN_SPLITS", "Race", "RaceRule", "check_race", "one_sided_p", "race", "released"]

DEFAULT_MIN_SPLITS = 3
DEFAULT_ALPHA = 0.05


@dataclass(frozen=True)
class RaceRule:
    """The settings of a race: `min_splits` splits before the first decision, drop at Holm-adjusted
    one-sided p < `alpha`; `ratio` = n_test / n_train of the splits (stats.holdout_ratio)."""
    min_splits: int
    alpha: float
    ratio: float


def check_race(min_splits: int | None, alpha: float, splits: int) -> list[str]:
    """What is wrong with the race flags for J = `splits` splits (one line per problem; [] when fine).
    `min_splits` None means the default, which needs no check (with J below it nothing is dropped)."""
    problems = []
    if not 0.0 < alpha <= 0.5:
        problems.append(f"--race-alpha={alpha:g} must be in (0, 0.5]")
    if min_splits is not None and not 2 <= min_splits <= splits:
        problems.append(f"--race-min-splits={min_splits} must be between 2 and the {splits} splits (k x repeats)")
    return problems


def one_sided_p(a, best, ratio: float) -> float:
    """One-sided p of "a is worse than best" from stats.corrected_paired_ttest (the same corrected
    variance, over the splits both have); NaN with fewer than 2 shared splits."""
    _, t, p = corrected_paired_ttest(a, best, ratio)
    if not np.isfinite(p):
        return float("nan")
    return float(p / 2.0 if t < 0 else 1.0 - p / 2.0)


@dataclass(frozen=True)
class Race:
    """Where a race stands: `dropped` maps a candidate to the number of splits after which it was
    dropped (a survivor is absent); `decided` is the last split count a decision was taken at (0: none)."""
    dropped: dict
    decided: int


def race(scores: pd.DataFrame, finished: pd.DataFrame, rule: RaceRule) -> Race:
    """Replay the race on a table of split scores.

    Parameters
    ----------
    scores : DataFrame
        index = candidate, one column per split in the order they are run, the split's validation
        accuracy; NaN where it failed or has not run.
    finished : DataFrame of bool, same shape
        whether the candidate's training on that split has ended (a failed one has ended too).
    rule : RaceRule

    Returns
    -------
    Race
        A decision after split n is taken only once every candidate still in the race has finished
        its first n splits, and only while more than one is left; decisions run in order
        n = min_splits, ..., J - 1 (after the last split there is nothing left to save: the final
        table's own statistics speak for it).
    """
    columns = list(scores.columns)
    dropped: dict = {}
    decided = 0
    for n in range(rule.min_splits, len(columns)):      # after the last split nothing is left to save
        alive = [c for c in scores.index if c not in dropped]
        if len(alive) <= 1 or not finished.loc[alive, columns[:n]].to_numpy().all():
            break
        for c in drop_round(scores.loc[alive, columns[:n]], rule):
            dropped[c] = n
        decided = n
    return Race(dropped, decided)


def drop_round(scores: pd.DataFrame, rule: RaceRule) -> list:
    """The candidates (rows) one decision drops: Holm-adjusted one-sided p against the best mean
    below alpha. The best (highest mean, the first of equals) is never tested, so never dropped."""
    values = scores.to_numpy(dtype=float)
    with np.errstate(all="ignore"):
        means = np.array([np.nanmean(v) if np.isfinite(v).any() else np.nan for v in values])
    if not np.isfinite(means).any():
        return []
    best = int(np.nanargmax(means))
    others = [i for i in range(len(values)) if i != best]
    p = np.array([one_sided_p(values[i], values[best], rule.ratio) for i in others])
    adjusted = holm(p)
    return [scores.index[i] for i, q in zip(others, adjusted) if np.isfinite(q) and q < rule.alpha]


def released(scores: pd.DataFrame, finished: pd.DataFrame, rule: RaceRule | None) -> dict:
    """Which splits each candidate may run now: candidate -> the number of leading splits released.

    Without a rule (no racing) every candidate gets every split. With one, the first `min_splits`
    splits are released at once (no decision can come before them); after the decision at split n
    the survivors get split n + 1; a candidate dropped after n keeps its n; the last one left gets
    every split."""
    splits = len(scores.columns)
    if rule is None:
        return {c: splits for c in scores.index}
    state = race(scores, finished, rule)
    alive = [c for c in scores.index if c not in state.dropped]
    upto = splits if len(alive) <= 1 else min(splits, max(rule.min_splits, state.decided + 1))
    return {c: state.dropped.get(c, upto) for c in scores.index}
