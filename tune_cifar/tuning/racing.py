"""Racing cross-validation through Ray Tune: a Searcher that hands out the (configuration, split)
trials split by split and asks the racing decision (core/racing.py) which candidates go on.

One Tuner runs the whole race, so --resume is Tuner.restore as for every experiment. The first
`min_splits` splits of every candidate are handed out at once (no decision can come earlier); after
the decision at split n, the survivors' split n + 1; when one candidate is left, all its remaining
splits. The searcher's state is the table of which (configuration, split) trials exist and what the
finished ones scored; on restore it is rebuilt from the trials in Tune's saved experiment state (the
truth of what ran), so a kill between Tune's two state files cannot make it hand out a split twice.
"""
from __future__ import annotations

import logging
import pickle
from typing import Any

import numpy as np
import pandas as pd
from ray.tune.search import Searcher

from ..core.racing import RaceRule, released
from ..core.trial import CANDIDATE, SPLIT, Status, status_of

ENDED = ("TERMINATED", "ERROR")          # Tune's statuses of a trial that will not run again


def split_score(result: dict[str, Any] | None, rounds: int, error: bool = False) -> float:
    """The validation accuracy a finished split counts with: its last round's when the trial is
    completed (core.trial.status_of, the rule kfold_folds.csv and kfold.csv use); else NaN."""
    result = result or {}
    status = status_of(reported=result.get("status"), rounds=int(result.get("training_iteration") or 0),
                       max_rounds=rounds, error=error)
    value = result.get("val_acc")
    return float(value) if status is Status.COMPLETED and value is not None else float("nan")


class RacingSearcher(Searcher):
    """Hands out {CANDIDATE: c, SPLIT: s} (core.trial's keys) for the race of candidates x splits.

    Parameters
    ----------
    rounds : list of int
        per candidate, the evaluation rounds of a complete split training.
    splits : int
        J = K x R.
    rule : RaceRule
    """

    def __init__(self, rounds: list[int], splits: int, rule: RaceRule):
        super().__init__()
        self.rounds, self.splits, self.rule = list(rounds), splits, rule
        self.handed: dict[str, tuple[int, int]] = {}       # trial id -> (candidate, split)
        self.scores: dict[tuple[int, int], float] = {}     # ended (candidate, split) -> accuracy or NaN

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True     # the param_space holds only constants, merged into every trial by Tune

    def table(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(scores, finished): candidate x split, as core.racing takes them."""
        idx, cols = range(len(self.rounds)), range(self.splits)
        scores = pd.DataFrame(np.nan, index=idx, columns=cols)
        finished = pd.DataFrame(False, index=idx, columns=cols)
        for (c, s), value in self.scores.items():
            scores.loc[c, s], finished.loc[c, s] = value, True
        return scores, finished

    def suggest(self, trial_id: str):
        upto = released(*self.table(), self.rule)
        taken = set(self.handed.values())
        for s in range(self.splits):            # split by split: every candidate's split 1, then 2, ...
            for c in range(len(self.rounds)):
                if s < upto[c] and (c, s) not in taken:
                    self.handed[trial_id] = (c, s)
                    return {CANDIDATE: c, SPLIT: s}
        if all(pair in self.scores for pair in taken):
            return Searcher.FINISHED            # nothing running, nothing more released: the race is over
        return None                             # wait for the split in flight

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.handed:
            c, s = self.handed[trial_id]
            self.scores[(c, s)] = split_score(result, self.rounds[c], error)

    def get_state(self) -> dict[str, Any]:
        return {"handed": self.handed, "scores": self.scores}

    def set_state(self, state: dict[str, Any]) -> None:
        self.handed, self.scores = dict(state["handed"]), dict(state["scores"])

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))

    def restore_from_dir(self, checkpoint_dir: str) -> None:
        """Tune's restore: the state rebuilt from the trials of the saved experiment state in
        `checkpoint_dir` (its own pickle may be a moment older or newer than that list)."""
        from ray.tune import ExperimentAnalysis
        logger = logging.getLogger("ray.tune.analysis.experiment_analysis")
        level = logger.level
        logger.setLevel(logging.ERROR)          # its warnings about trials with no results yet
        try:
            trials = ExperimentAnalysis(checkpoint_dir).trials
        finally:
            logger.setLevel(level)
        self.handed, self.scores = {}, {}
        for trial in trials:
            pair = (int(trial.config[CANDIDATE]), int(trial.config[SPLIT]))
            self.handed[trial.trial_id] = pair
            if trial.status in ENDED:
                self.scores[pair] = split_score(trial.last_result, self.rounds[pair[0]], trial.status == "ERROR")


def race_settings(rounds: list[int], splits: int, rule: RaceRule) -> dict[str, Any]:
    """The TuneConfig settings of a race: the RacingSearcher, room for every (candidate, split) trial.
    Not wrapped in a ConcurrencyLimiter (max_concurrent_trials): on restore its own saved set of live
    trials can be older than Tune's trial list, and it passes no completion of a trial it does not
    know on to the searcher, which would then wait for that split for ever. (Without it Tune keeps one
    trial pending at a time for a custom searcher: a cluster fills up trial by trial.)"""
    return dict(search_alg=RacingSearcher(rounds, splits, rule), num_samples=len(rounds) * splits)
