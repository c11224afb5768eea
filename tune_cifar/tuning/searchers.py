"""Search algorithms and the ASHA scheduler for `search`, with an Optuna study that tells the truth.

Ray's OptunaSearch (ray 2.60, ray/tune/search/optuna/optuna_search.py) tells Optuna every trial that
ended with a metric as COMPLETE with the metric of its last result, whether it ran all max_t rounds
or ASHA stopped it after one. And the round at which a trial stops never becomes an intermediate
value: the controller passes a result to the searcher's on_trial_result only when the scheduler let
the trial go on (ray/tune/execution/tune_controller.py, `_process_trial_result`: "Only updating
search alg if the trial is not to be stopped"); the stopping result reaches only on_trial_complete,
as `trial.last_result`. So TPE ranks a 1-round trial stopped by ASHA with its (low) round-1 accuracy
among the finished ones, and never sees the curve's last point.

TruthfulOptunaSearch (feedback="pruned") keeps Ray's OptunaSearch and changes what it tells Optuna:

* every reported round's metric is an intermediate value at step = training_iteration, including
  the last one (taken from on_trial_complete's result); a step already stored (a restored trial
  re-running rounds) is skipped;
* a trial that reached max_t rounds, or whose last result has status "early_stopped" (its own
  patience), "diverged" or "oom" (val_acc 0.0), is COMPLETE with its last metric;
* a trial that ended before max_t otherwise (ASHA, the time budget, stopped before it reported) is
  PRUNED: Optuna keeps its curve and sets its value to its last intermediate value; TPE ranks pruned
  trials after the complete ones, by the step they reached, then by that value
  (optuna/samplers/_tpe/sampler.py, `_get_pruned_trial_score`);
* an errored trial is FAIL; a non-finite last metric is FAIL too (Optuna refuses to tell it COMPLETE
  and Ray's OptunaSearch then only logs a warning, leaving the trial RUNNING in the study).

feedback="complete" is Ray's OptunaSearch unchanged (for a benchmark of the two).

The time budget: when `time_budget_s` runs out, Ray stops the live trials without calling the
searcher's on_trial_complete at all (tune_controller.py, `_stop_experiment_if_needed` ->
`_schedule_trial_stop`), so they would stay RUNNING in the study forever. `search_callbacks(search_alg)`
returns a Tune Callback that closes them (on_step_end: a trial Ray has TERMINATED/ERROR that the
searcher still holds open); pass it in RunConfig(callbacks=...). It does nothing after Ctrl-C: Ray
stops the trials in cleanup after the last step, so they stay RUNNING and a resume carries on with them.

Random search (kind "random") is Ray Tune's BasicVariantGenerator; the searched keys must then be in
the Tuner's param_space as Tune distributions: `param_space = {**constants, **tune_space(optuna_space)}`.
Its search_callbacks() callback also records the random trials in optuna.db (same study name, same
COMPLETE/PRUNED/FAIL rules, intermediate values, user attribute "ray_trial_id"), so reports read the
study the same way; that study is only written, never asked for suggestions.

save/restore (Tuner.restore on --resume): OptunaSearch.save pickles the searcher's whole __dict__,
so the state added here (max_t, feedback, the steps reported per trial) goes with it. The sqlite
study is written at every report but the searcher is pickled only at experiment checkpoints, so
restore() then re-reads, for every trial it holds, the steps stored and whether it is finished from
the study itself.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Iterable

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from ray import tune
from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch
from ray.tune.utils.util import flatten_dict, unflatten_dict

from ..core.trial import OWN_ENDINGS

logger = logging.getLogger(__name__)

FEEDBACKS = ("pruned", "complete")
KINDS = ("tpe", "random")
STEP = "training_iteration"                       # Optuna's step, and what max_t counts
STATUS = "status"                                 # the trainable's own status metric
COMPLETE_STATUSES = frozenset(s.value for s in OWN_ENDINGS)    # ended by their own rule: COMPLETE
TRIAL_ID_ATTR = "ray_trial_id"                    # user attribute of recorded random trials


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def told(result: dict[str, Any] | None, metric: str, max_t: int,
         error: bool = False) -> tuple[TrialState, float | None]:
    """What to tell Optuna about a trial that ended with (flattened) last result `result`:
    (state, value); value None for PRUNED (Optuna takes the last intermediate value) and FAIL."""
    if error:
        return TrialState.FAIL, None
    value = _number((result or {}).get(metric))
    if value is None:                              # never reported (stopped while pending): as Ray does
        return TrialState.PRUNED, None
    if not math.isfinite(value):
        return TrialState.FAIL, None
    if result.get(STATUS) in COMPLETE_STATUSES or (result.get(STEP) or 0) >= max_t:
        return TrialState.COMPLETE, value
    return TrialState.PRUNED, None


class TruthfulOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch, telling Optuna the intermediate values and PRUNED for stopped trials
    (see the module docstring). Single objective only with feedback="pruned" (a list metric falls
    back to Ray's behaviour)."""

    def __init__(self, *args: Any, max_t: int, feedback: str = "pruned", **kwargs: Any):
        if feedback not in FEEDBACKS:
            raise ValueError(f"feedback={feedback!r}: must be one of {', '.join(FEEDBACKS)}")
        if int(max_t) < 1:
            raise ValueError(f"max_t={max_t!r}: must be at least 1")
        self._max_t = int(max_t)
        self._feedback = feedback
        self._reported: dict[str, set[int]] = {}   # trial_id -> steps stored as intermediate values
        super().__init__(*args, **kwargs)

    @property
    def feedback(self) -> str:
        return self._feedback

    @property
    def max_t(self) -> int:
        return self._max_t

    def _plain(self) -> bool:
        return self._feedback == "complete" or isinstance(self.metric, list)

    def _report(self, trial_id: str, result: dict[str, Any]) -> None:
        value, step = _number(result.get(self.metric)), result.get(STEP)
        if value is None or step is None:
            return
        step = int(step)
        steps = self._reported.setdefault(trial_id, set())
        if step in steps:
            return
        try:
            self._ot_trials[trial_id].report(value, step)
        except Exception as exc:                   # e.g. the study holds the trial finished already
            logger.warning("trial %s: intermediate value at step %s not stored: %s", trial_id, step, exc)
            return
        steps.add(step)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self._plain():
            return super().on_trial_result(trial_id, result)
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            logger.warning("result for trial %s, which is finished or unknown: ignored", trial_id)
            return
        self._report(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if self._plain():
            return super().on_trial_complete(trial_id, result=result, error=error)
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            logger.warning("completion of trial %s, which is finished or unknown: ignored", trial_id)
            return
        if result and not error:
            self._report(trial_id, result)        # the last round never reached on_trial_result
        state, value = told(result, self.metric, self._max_t, error)
        try:
            self._ot_study.tell(self._ot_trials[trial_id], value, state=state)
        except Exception as exc:
            logger.warning("trial %s: could not tell Optuna %s: %s", trial_id, state.name, exc)
        self._completed_trials.add(trial_id)

    def close_stopped(self, trials: Iterable[Trial]) -> int:
        """Tell Optuna about trials Ray ended without calling on_trial_complete (the time budget):
        those TERMINATED or ERROR in Ray but still open here. Returns how many it closed."""
        if self._plain():
            return 0
        closed = 0
        for trial in trials:
            tid = trial.trial_id
            if trial.status in (Trial.TERMINATED, Trial.ERROR) and tid in self._ot_trials \
                    and tid not in self._completed_trials:
                last = flatten_dict(trial.last_result) if trial.last_result else None
                self.on_trial_complete(tid, result=last, error=trial.status == Trial.ERROR)
                closed += 1
        return closed

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        # A pickle from before this class (or of a plain OptunaSearch) lacks our attributes.
        self.__dict__.setdefault("_max_t", 10 ** 9)
        self.__dict__.setdefault("_feedback", "complete")
        self.__dict__.setdefault("_reported", {})
        self._sync_with_study()

    def _sync_with_study(self) -> None:
        """The study is written at once, the pickle only at checkpoints: take from the study the
        steps stored and which trials are finished."""
        if self._ot_study is None or not self._ot_trials:
            return
        frozen = {t.number: t for t in self._ot_study.get_trials(deepcopy=False)}
        for tid, ot_trial in self._ot_trials.items():
            ft = frozen.get(ot_trial.number)
            if ft is None:
                continue
            self._reported.setdefault(tid, set()).update(ft.intermediate_values)
            if ft.state.is_finished():
                self._completed_trials.add(tid)


class CloseStoppedTrials(Callback):
    """After every step of the Tune loop, closes in the study the trials the time budget stopped."""

    def __init__(self, searcher: TruthfulOptunaSearch):
        self.searcher = searcher

    def on_step_end(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        self.searcher.close_stopped(trials)


class RandomTrialRecorder(Callback):
    """Records the trials of a random search (BasicVariantGenerator) in an Optuna study with the
    rules of TruthfulOptunaSearch. It is no searcher: its study is only written. Which Optuna trial
    is which Ray trial is the user attribute "ray_trial_id", found again after a resume."""

    def __init__(self, optuna_space: dict[str, Any], metric: str, mode: str, max_t: int,
                 storage: Any = None, study_name: str | None = None, seed: int | None = None):
        self.space = dict(optuna_space)
        self.book = TruthfulOptunaSearch(
            space=self.space, metric=metric, mode=mode, max_t=max_t, feedback="pruned",
            sampler=optuna.samplers.RandomSampler(seed=seed), storage=storage, study_name=study_name)

    @property
    def study(self) -> optuna.Study:
        return self.book._ot_study

    def _adopt(self, trial: Trial) -> bool:
        """The Optuna trial of this Ray trial, created (or found again) on its first result;
        False when the study holds it finished already."""
        book, tid = self.book, trial.trial_id
        if tid in book._completed_trials:
            return False
        if tid in book._ot_trials:
            return True
        for ft in self.study.get_trials(deepcopy=False):
            if ft.user_attrs.get(TRIAL_ID_ATTR) == tid:
                if ft.state.is_finished():
                    book._completed_trials.add(tid)
                    return False
                book._ot_trials[tid] = optuna.trial.Trial(self.study, ft._trial_id)
                book._reported[tid] = set(ft.intermediate_values)
                return True
        config = flatten_dict(trial.config)
        params = {k: _plain_value(config[k]) for k in self.space if k in config}
        self.study.enqueue_trial(params, user_attrs={TRIAL_ID_ATTR: tid})
        book._ot_trials[tid] = self.study.ask(fixed_distributions=self.space)
        return True

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict,
                        **info: Any) -> None:
        if self._adopt(trial):
            self.book.on_trial_result(trial.trial_id, flatten_dict(result))

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        if self._adopt(trial):
            last = flatten_dict(trial.last_result) if trial.last_result else None
            self.book.on_trial_complete(trial.trial_id, result=last)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        if self._adopt(trial):
            self.book.on_trial_complete(trial.trial_id, error=True)

    def on_step_end(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        self.book.close_stopped(trials)


class RandomSearch(BasicVariantGenerator):
    """Ray Tune's BasicVariantGenerator carrying the recorder that search_callbacks() returns."""

    def __init__(self, *args: Any, recorder: RandomTrialRecorder | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.recorder = recorder


def _plain_value(v: Any) -> Any:
    """numpy scalars (what Tune samples) as Python ones, which Optuna can store as JSON."""
    return v.item() if hasattr(v, "item") and not isinstance(v, (str, bytes)) else v


def tune_space(optuna_space: dict[str, Any]) -> dict[str, Any]:
    """Optuna distributions as Tune ones, with the same values (Optuna's highs are inclusive, Tune's
    integer highs exclusive); keys with "/" become nested dicts, as OptunaSearch's suggestions."""
    out: dict[str, Any] = {}
    for name, d in optuna_space.items():
        if isinstance(d, FloatDistribution):
            if d.log:
                out[name] = tune.loguniform(d.low, d.high)
            elif d.step is not None:
                n = int(round((d.high - d.low) / d.step))
                out[name] = tune.choice([d.low + i * d.step for i in range(n + 1)])
            else:
                out[name] = tune.uniform(d.low, d.high)
        elif isinstance(d, IntDistribution):
            if d.log:
                out[name] = tune.lograndint(d.low, d.high + 1)
            elif d.step != 1:
                out[name] = tune.choice(list(range(d.low, d.high + 1, d.step)))
            else:
                out[name] = tune.randint(d.low, d.high + 1)
        elif isinstance(d, CategoricalDistribution):
            out[name] = tune.choice(list(d.choices))
        else:
            raise TypeError(f"{name}: no Tune equivalent of {type(d).__name__}")
    return unflatten_dict(out)


def make_search_alg(kind: str, optuna_space: dict[str, Any], points_to_evaluate: list[dict[str, Any]] | None,
                    metric: str, mode: str, seed: int | None, storage: Any, study_name: str | None,
                    max_t: int, feedback: str = "pruned", max_live: int = 0):
    """The search_alg for tune.TuneConfig. "tpe": TruthfulOptunaSearch (TPE seeded with `seed`,
    study `study_name` in `storage`). "random": Ray Tune's BasicVariantGenerator seeded through
    random_state (the param_space must hold tune_space(optuna_space)), whose recorder writes the
    same study. Pass search_callbacks(search_alg) to RunConfig(callbacks=...) in both cases.
    `max_live` (random only; 0: no limit) caps the trials it keeps pending or running: left alone,
    BasicVariantGenerator queues hundreds of trials up front, and a --time-budget search then ends
    with them all in trials.csv as not_run (200 of 223 in `bench --only search_quality`). The draws
    and their order are the same either way."""
    if feedback not in FEEDBACKS:
        raise ValueError(f"feedback={feedback!r}: must be one of {', '.join(FEEDBACKS)}")
    points = [dict(p) for p in points_to_evaluate or []]
    if kind == "tpe":
        return TruthfulOptunaSearch(space=dict(optuna_space), metric=metric, mode=mode, points_to_evaluate=points,
                                    storage=storage, study_name=study_name, seed=seed, max_t=max_t,
                                    feedback=feedback)
    if kind == "random":
        recorder = RandomTrialRecorder(optuna_space, metric, mode, max_t, storage=storage,
                                       study_name=study_name, seed=seed)
        return RandomSearch(points_to_evaluate=points or None, random_state=seed, recorder=recorder,
                            max_concurrent=max_live)
    raise ValueError(f"search kind {kind!r}: must be one of {', '.join(KINDS)}")


def search_callbacks(search_alg: Any) -> list[Callback]:
    """The Tune callbacks that complete a search_alg of make_search_alg (for RunConfig(callbacks=...)):
    closing time-budget-stopped trials in the study, or recording random trials in it."""
    if isinstance(search_alg, TruthfulOptunaSearch) and search_alg.feedback == "pruned":
        return [CloseStoppedTrials(search_alg)]
    if isinstance(search_alg, RandomSearch) and search_alg.recorder is not None:
        return [search_alg.recorder]
    return []


def make_scheduler(max_t: int, grace_period: int, reduction_factor: float, brackets: int = 1) -> ASHAScheduler:
    """ASHA on training_iteration (one per evaluation round); metric and mode come from TuneConfig."""
    return ASHAScheduler(time_attr=STEP, max_t=max_t, grace_period=grace_period,
                         reduction_factor=reduction_factor, brackets=brackets)
