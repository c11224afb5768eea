"""The racing searcher (tuning/racing.py) driven by hand, as Tune drives it, without running Ray:
splits are handed out split by split, a loser gets no split after its drop, the winner all of them,
and the searcher says FINISHED when the race is over."""
from __future__ import annotations

from ray.tune.search import Searcher

from tune_cifar.core.racing import RaceRule
from tune_cifar.core.stats import holdout_ratio
from tune_cifar.tuning.racing import RacingSearcher, split_score

K = 5
SCORES = {0: [0.40, 0.42, 0.41, 0.43, 0.40], 1: [0.41, 0.40, 0.42, 0.42, 0.41], 2: [0.12, 0.11, 0.13, 0.10, 0.12]}


def drive(searcher: RacingSearcher) -> list[tuple[int, int]]:
    """Ask for trials until FINISHED; when the searcher waits, finish the oldest running trial."""
    handed, running, n = [], [], 0
    while True:
        config = searcher.suggest(f"t{n}")
        if config == Searcher.FINISHED:
            assert not running
            return handed
        if config is None:
            assert running, "the searcher waits with nothing running"
            tid, (c, s) = running.pop(0)
            searcher.on_trial_complete(tid, {"val_acc": SCORES[c][s], "training_iteration": 2, "status": "running"})
            continue
        pair = (config["_candidate"], config["_fold_index"])
        handed.append(pair)
        running.append((f"t{n}", pair))
        n += 1


def test_the_race_hands_out_splits_in_order_and_stops_the_loser():
    searcher = RacingSearcher([2, 2, 2], K, RaceRule(3, 0.05, holdout_ratio(K)))
    handed = drive(searcher)
    assert handed[:9] == [(c, s) for s in range(3) for c in range(3)]      # the first 3 splits at once
    assert sorted(handed) == sorted({*[(c, s) for c in (0, 1) for s in range(K)], (2, 0), (2, 1), (2, 2)})
    assert [s for _, s in handed] == sorted(s for _, s in handed)              # split by split


def test_without_a_rival_the_last_one_gets_every_split_at_once():
    searcher = RacingSearcher([2, 2], K, RaceRule(3, 0.05, holdout_ratio(K)))
    searcher.scores = {(c, s): SCORES[c * 2][s] for c in range(2) for s in range(3)}
    searcher.handed = {f"x{c}{s}": (c, s) for c in range(2) for s in range(3)}
    more = [searcher.suggest(f"n{i}") for i in range(3)]
    assert more == [{"_candidate": 0, "_fold_index": 3}, {"_candidate": 0, "_fold_index": 4}, None]


def test_a_split_that_did_not_complete_counts_as_failed():
    assert split_score({"val_acc": 0.4, "training_iteration": 2, "status": "running"}, 2) == 0.4
    for result, error in (({"val_acc": 0.4, "training_iteration": 1, "status": "running"}, False),
                          ({"val_acc": 0.0, "training_iteration": 2, "status": "diverged"}, False),
                          (None, True)):
        assert split_score(result, 2, error) != split_score(result, 2, error)     # NaN
