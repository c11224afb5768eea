"""Optuna's search plots over every trial that reported a round, pruned ones included.

Optuna's plot functions (optuna/visualization/_optimization_history.py, _parallel_coordinate.py,
_param_importances.py) read only COMPLETE trials. The study of an ASHA search tells the truth, so most
of its trials are PRUNED, each with its curve as intermediate values: drawn as they are, the plots
show the few trials that ran the whole budget and say least where ASHA did most.

So the plots are drawn, by Optuna's own functions, from plotting copies of the study (in memory,
never written back): every trial that reported a round becomes COMPLETE at the value of the last
round it reached (for a pruned trial: the ASHA rung that stopped it), and that round is shown:

* optimisation history: one Optuna series per round reached (its colour and legend entry), every
  trial at its own trial number;
* parallel coordinates: the round reached is one more axis, RUNG_PARAM;
* importance (fANOVA): every trial at the last round all of them reached (ASHA's first rung), so
  each is judged after the same training, never a stopped trial against a finished one.

Where a picture could say nothing (one trial, no parameter that varied, fewer than
MIN_TRIALS_PER_PARAM trials per varied parameter for the importance, every trial scoring the same)
it is not drawn; Picture.note says why.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import optuna
from matplotlib.collections import LineCollection
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

RUNG_PARAM = "round reached"           # the parallel-coordinates axis of the round each trial reached
MIN_TRIALS_PER_PARAM = 2               # importance from fewer trials per varied parameter says nothing
IMPORTANCE_SEED = 0                    # fANOVA's random forest: the same report for the same study


@dataclass(frozen=True)
class Reached:
    """A trial that reported a round: the round it reached last and its value there."""
    trial: FrozenTrial
    step: int | None        # None: the study holds no intermediate values (Ray's plain OptunaSearch)
    value: float


@dataclass
class Picture:
    """One search plot: the Axes Optuna drew (None where it says nothing) and a caption, or the
    note saying why it was not drawn."""
    title: str
    ax: Any = None
    caption: str = ""
    note: str = ""


def reached_trials(study: optuna.Study) -> list[Reached]:
    """Every trial with a finite value to show: a COMPLETE trial at its value, any other (PRUNED,
    FAIL after some rounds, RUNNING) at its last finite intermediate value; trials that reported no
    round are left out. In trial-number order."""
    out = []
    for t in study.get_trials(deepcopy=False):
        rounds = {s: v for s, v in t.intermediate_values.items() if math.isfinite(v)}
        step = max(rounds) if rounds else None
        if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value):
            value = t.value
        elif step is not None:
            value = rounds[step]
        else:
            continue
        out.append(Reached(t, step, float(value)))
    return out


def round_label(step: int | None, epochs_at: dict[int, float] | None = None) -> str:
    """'round 3 (epoch 1.5)'; the epoch where the history says which it is."""
    if step is None:
        return "round not recorded"
    epoch = (epochs_at or {}).get(step)
    return f"round {step}" + (f" (epoch {epoch:g})" if epoch is not None else "")


def _copy_trial(r: Reached, value: float, extra: dict[str, Any] | None = None) -> FrozenTrial:
    """The trial as COMPLETE at `value`, its params (plus `extra`: param -> (value, distribution))."""
    params, dists = dict(r.trial.params), dict(r.trial.distributions)
    for name, (v, d) in (extra or {}).items():
        params[name], dists[name] = v, d
    return optuna.trial.create_trial(
        state=TrialState.COMPLETE, value=value, params=params, distributions=dists,
        intermediate_values=dict(r.trial.intermediate_values),
        user_attrs={**r.trial.user_attrs, "number": r.trial.number, "state": r.trial.state.name,
                    "round_reached": r.step})


def plotting_study(study: optuna.Study, trials: list[FrozenTrial], name: str | None = None) -> optuna.Study:
    """An in-memory study of `trials` (numbered 0.. in that order) with `study`'s direction."""
    copy = optuna.create_study(direction=study.direction, study_name=name or study.study_name)
    copy.add_trials(trials)
    return copy


def _placeholder(t: FrozenTrial) -> FrozenTrial:
    """A trial that keeps its number in a per-round copy but is not drawn there (Optuna's history
    draws only COMPLETE trials)."""
    return optuna.trial.create_trial(state=TrialState.FAIL, params=t.params, distributions=t.distributions)


def varied_params(reached: list[Reached]) -> tuple[list[str], list[str]]:
    """(searched parameters that every trial has and that took two values or more, the others)."""
    names = sorted({p for r in reached for p in r.trial.distributions
                    if not r.trial.distributions[p].single()})
    varied, fixed = [], []
    for p in names:
        values = [r.trial.params.get(p) for r in reached]
        (varied if None not in values and len(set(map(repr, values))) > 1 else fixed).append(p)
    return varied, fixed


def _counts(reached: list[Reached], epochs_at: dict[int, float] | None) -> str:
    steps = sorted({r.step for r in reached}, key=lambda s: (s is None, s or 0))
    return ", ".join(f"{sum(r.step == s for r in reached)} at {round_label(s, epochs_at)}" for s in steps)


def history_picture(study: optuna.Study, reached: list[Reached], metric: str,
                    epochs_at: dict[int, float] | None = None) -> Picture:
    """Optuna's optimisation history with one series per round reached: each trial at its own
    number, at the value of its last round."""
    title = "Optimisation history (every trial, at the last round it reached)"
    if len(reached) < 2:
        return Picture(title, note=f"optimisation history not drawn: {len(reached)} trial(s) reported a "
                                   "round; a history needs two")
    import optuna.visualization.matplotlib as ovm
    everyone = study.get_trials(deepcopy=False)
    studies = []
    for step in sorted({r.step for r in reached}, key=lambda s: (s is not None, s or 0), reverse=True):
        here = {r.trial.number: r for r in reached if r.step == step}
        trials = [_copy_trial(here[t.number], here[t.number].value) if t.number in here else _placeholder(t)
                  for t in everyone]
        studies.append(plotting_study(study, trials, f"{round_label(step, epochs_at)}, {len(here)} trial(s)"))
    ax = ovm.plot_optimization_history(studies, target_name=metric)
    ax.figure.set_size_inches(10, 4.5)          # room for the legend Optuna puts beside the axes
    ax.set_title("Optimisation history: every trial at its last round (colour: the round reached)",
                 fontsize=10)
    caption = (f"Every trial that reported a round, at its {metric} in the last round it reached: a trial "
               f"ASHA stopped is drawn at the rung that stopped it ({_counts(reached, epochs_at)}). "
               "One colour per round reached; its line is the best value so far among those trials. "
               "Trial: Optuna's trial number, from 0.")
    return Picture(title, ax, caption)


def parallel_picture(study: optuna.Study, reached: list[Reached], metric: str,
                     epochs_at: dict[int, float] | None = None) -> Picture:
    """Optuna's parallel coordinates over every trial at its last value, with the round reached as
    an axis (RUNG_PARAM) when trials stopped at different rounds."""
    title = "Parallel coordinates (every trial, at the last round it reached)"
    varied, fixed = varied_params(reached)
    if len(reached) < 2 or not varied:
        why = f"{len(reached)} trial(s) reported a round" if len(reached) < 2 else \
            f"no searched parameter took two values ({', '.join(fixed) or 'none searched'})"
        return Picture(title, note=f"parallel coordinates not drawn: {why}")
    import optuna.visualization.matplotlib as ovm
    steps = sorted({r.step for r in reached if r.step is not None})
    with_rung = len(steps) > 1 and all(r.step is not None for r in reached)
    rung = CategoricalDistribution(tuple(steps)) if with_rung else None
    copy = plotting_study(study, [_copy_trial(r, r.value, {RUNG_PARAM: (r.step, rung)} if with_rung else None)
                                  for r in reached])
    ax = ovm.plot_parallel_coordinate(copy, params=varied + ([RUNG_PARAM] if with_rung else []),
                                      target_name=metric)
    _no_white_lines(ax)
    axes = 1 + len(varied) + with_rung
    ax.figure.set_size_inches(max(6.4, 1.4 * axes + 1.5), 4.8)    # Optuna's 6.4 in crowd 5 axes' ticks
    ax.set_title(f"Parallel coordinates: {len(reached)} trials at their last round"
                 + (f" (axis '{RUNG_PARAM}')" if with_rung else ""), y=1.03, fontsize=10)
    caption = (f"All {len(reached)} trials that reported a round, at their {metric} in the last round "
               f"reached ({_counts(reached, epochs_at)})"
               + (f"; the axis '{RUNG_PARAM}' is that round, so a line stopped early shows where" if with_rung else "")
               + f". Colour: {metric} (its scale starts beyond the worst value, so that line is not white)."
               + (f" Not varied, not drawn: {', '.join(fixed)}." if fixed else ""))
    return Picture(title, ax, caption)


def _no_white_lines(ax) -> None:
    """Optuna colours the lines with Blues, whose end is white: the worst trial's line would be
    invisible on the white background. The colour scale (and its colour bar) starts a third of
    the value range beyond the worst value instead."""
    for lines in ax.collections:
        if isinstance(lines, LineCollection) and lines.get_array() is not None:
            low, high = lines.get_clim()
            pad = 0.35 * ((high - low) or abs(high) or 1.0)
            reverse = lines.get_cmap().name.endswith("_r")      # minimising: the worst is the highest
            lines.set_clim(low, high + pad) if reverse else lines.set_clim(low - pad, high)


def common_round(reached: list[Reached]) -> int | None:
    """The last round every trial reported (ASHA's first rung), or None when some trial has none."""
    steps = [set(s for s, v in r.trial.intermediate_values.items() if math.isfinite(v)) for r in reached]
    shared = set.intersection(*steps) if steps and all(steps) else set()
    return max(shared) if shared else None


def importance_picture(study: optuna.Study, reached: list[Reached], metric: str,
                       epochs_at: dict[int, float] | None = None) -> Picture:
    """Optuna's fANOVA importance of the varied parameters, every trial taken at the last round all of
    them reached; not drawn where it could say nothing."""
    title = "Hyper-parameter importance (fANOVA, every trial at the same round)"
    step = common_round(reached)
    values = [r.trial.intermediate_values[step] if step is not None else r.value for r in reached]
    at = f"at {round_label(step, epochs_at)}, the last round all {len(reached)} trials reached" \
        if step is not None else "at each trial's last value (rounds not recorded)"
    varied, fixed = varied_params(reached)
    fixed_note = f" Not varied (importance 0 by definition): {', '.join(fixed)}." if fixed else ""
    why = None
    if len(reached) < 2:
        why = f"{len(reached)} trial(s) reported a round"
    elif not varied:
        why = f"no searched parameter took two values ({', '.join(fixed) or 'none searched'})"
    elif len(varied) == 1:
        why = f"only {varied[0]} varied: its share of the variance is 1 by definition"
    elif len(reached) < MIN_TRIALS_PER_PARAM * len(varied):
        why = (f"{len(reached)} trial(s) for {len(varied)} varied parameters ({', '.join(varied)}); "
               f"an importance needs at least {MIN_TRIALS_PER_PARAM} trials per parameter")
    elif len(set(values)) < 2:
        why = f"every trial scored {metric}={values[0]:g} {at}: there is no variance to explain"
    if why:
        return Picture(title, note=f"hyper-parameter importance not drawn: {why}.{fixed_note}")
    import optuna.visualization.matplotlib as ovm
    copy = plotting_study(study, [_copy_trial(r, v) for r, v in zip(reached, values)])
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=IMPORTANCE_SEED)
    raw = optuna.importance.get_param_importances(copy, evaluator=evaluator, params=varied, normalize=False)
    if not any(v > 0 for v in raw.values()):
        return Picture(title, note=f"hyper-parameter importance not drawn: fANOVA explains none of the "
                                   f"variance of {metric} {at} by {', '.join(varied)}.{fixed_note}")
    ax = ovm.plot_param_importances(copy, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=IMPORTANCE_SEED),
                                    params=varied, target_name=metric)
    ax.set_title(f"Importance for {metric} at " + (round_label(step, epochs_at) if step is not None else
                 "each trial's last value") + f", {len(reached)} trials", loc="left", fontsize=10)
    caption = (f"fANOVA (Optuna's FanovaImportanceEvaluator, seed {IMPORTANCE_SEED}) of {metric} {at}, so "
               f"every trial is judged after the same training.{fixed_note}")
    return Picture(title, ax, caption)


def search_pictures(study: optuna.Study, metric: str = "val_acc",
                    epochs_at: dict[int, float] | None = None) -> list[Picture]:
    """The three search plots of `study` (see the module docstring). Optuna's matplotlib backend sets
    the ggplot style globally: it stays inside this call, the report's other figures keep theirs."""
    reached = reached_trials(study)
    pictures = []
    for make, title in ((history_picture, "Optimisation history"), (parallel_picture, "Parallel coordinates"),
                        (importance_picture, "Hyper-parameter importance")):
        with matplotlib.rc_context(), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                pictures.append(make(study, reached, metric, epochs_at))
            except Exception as e:      # a study this module did not foresee: the report still gets made
                plt.close("all")
                pictures.append(Picture(title, note=f"{title.lower()} not drawn ({type(e).__name__}: "
                                                    f"{str(e)[:120]})"))
    return pictures
