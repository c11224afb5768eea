"""The racing decision (core/racing.py) on given tables of split accuracies: a clear loser is dropped
at the first decision, a near-tie runs to the end, the best is never dropped, and the splits handed
out follow the race."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from tune_cifar.core import racing
from tune_cifar.core.stats import holdout_ratio

K = 5
RULE = racing.RaceRule(min_splits=3, alpha=0.05, ratio=holdout_ratio(K))

BEST = [0.40, 0.42, 0.41, 0.43, 0.40]
NEAR_TIE = [0.41, 0.40, 0.42, 0.42, 0.41]        # +-1 point around BEST, no consistent direction
LOSER = [0.12, 0.11, 0.13, 0.10, 0.12]           # ~29 points below BEST on every split


def table(rows: dict[str, list[float]], ran: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(scores, finished) with the first `ran` splits finished (all by default)."""
    scores = pd.DataFrame(rows, index=range(K)).T
    finished = pd.DataFrame(True, index=scores.index, columns=scores.columns)
    if ran is not None:
        scores.loc[:, ran:] = np.nan
        finished.loc[:, ran:] = False
    return scores, finished


def test_a_clear_loser_is_dropped_at_split_3_and_a_near_tie_runs_to_the_end():
    scores, finished = table({"best": BEST, "tie": NEAR_TIE, "loser": LOSER})
    state = racing.race(scores, finished, RULE)
    assert state.dropped == {"loser": 3}
    assert state.decided == K - 1          # no decision after the last split: nothing left to save


def test_the_one_sided_p_is_the_corrected_t_test_of_stats():
    a, b = np.array(LOSER[:3]), np.array(BEST[:3])
    d = a - b
    t = d.mean() / np.sqrt((1 / 3 + RULE.ratio) * d.var(ddof=1))      # Nadeau & Bengio, by hand
    assert racing.one_sided_p(a, b, RULE.ratio) == pytest.approx(sps.t.cdf(t, 2))
    assert racing.one_sided_p(b, a, RULE.ratio) == pytest.approx(sps.t.sf(t, 2))     # the other way round


def test_nothing_is_decided_before_min_splits_or_before_every_survivor_finished():
    scores, finished = table({"best": BEST, "loser": LOSER}, ran=2)
    assert racing.race(scores, finished, RULE).dropped == {}
    assert racing.released(scores, finished, RULE) == {"best": 3, "loser": 3}   # the first 3 at once
    scores, finished = table({"best": BEST, "tie": NEAR_TIE, "loser": LOSER}, ran=3)
    finished.loc["tie", 2] = False                # the tie's split 3 still runs: no decision yet
    scores.loc["tie", 2] = np.nan
    assert racing.race(scores, finished, RULE).dropped == {}


def test_released_splits_follow_the_race():
    scores, finished = table({"best": BEST, "tie": NEAR_TIE, "loser": LOSER}, ran=3)
    assert racing.released(scores, finished, RULE) == {"best": 4, "tie": 4, "loser": 3}
    scores, finished = table({"best": BEST, "loser": LOSER}, ran=3)
    # one candidate left: all its remaining splits at once
    assert racing.released(scores, finished, RULE) == {"best": K, "loser": 3}
    assert racing.released(scores, finished, None) == {"best": K, "loser": K}     # --no-race


def test_holm_keeps_candidates_single_tests_would_drop():
    # each worse than BEST on the first 3 splits with a raw one-sided p in (0.025, 0.05): alone, each
    # is dropped; together, Holm doubles the smaller p past 0.05 and both stay
    close = [0.36, 0.40, 0.37, 0.41, 0.36]
    close2 = [0.38, 0.40, 0.37, 0.41, 0.39]
    scores, finished = table({"best": BEST, "close": close, "close2": close2}, ran=3)
    for name in ("close", "close2"):
        assert 0.025 < racing.one_sided_p(scores.loc[name], scores.loc["best"], RULE.ratio) < 0.05
        alone = racing.race(scores.loc[["best", name]], finished.loc[["best", name]], RULE)
        assert alone.dropped == {name: 3}
    assert racing.race(scores, finished, RULE).dropped == {}


def test_the_best_is_never_dropped():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(2, 7))
        scores = pd.DataFrame(rng.uniform(0.1, 0.6, (n, K)) + rng.uniform(0, 0.3, (n, 1)))
        finished = pd.DataFrame(True, index=scores.index, columns=scores.columns)
        state = racing.race(scores, finished, RULE)
        assert len(state.dropped) < n
        for c, after in state.dropped.items():
            alive = [i for i in scores.index if state.dropped.get(i, K + 1) >= after]
            means = scores.loc[alive, range(after)].mean(axis=1)
            assert means.idxmax() != c
        winner = scores.loc[[i for i in scores.index if i not in state.dropped]].mean(axis=1).idxmax()
        assert winner not in state.dropped


@pytest.mark.parametrize("min_splits, alpha, problem", [
    (None, 0.0, "--race-alpha"), (None, 0.6, "--race-alpha"), (1, 0.05, "--race-min-splits"),
    (6, 0.05, "--race-min-splits"), (None, 0.5, None), (5, 0.01, None), (2, 0.05, None)])
def test_race_flags_are_checked(min_splits, alpha, problem):
    problems = racing.check_race(min_splits, alpha, K)
    assert (problems[0].split("=")[0] if problems else None) == problem
