"""`search NAME`: Ray Tune + Optuna TPE (or random search) + ASHA over a search space, then the best
trial's test.

plan_search() checks everything (space, flags, data, weights, results folder) and touches nothing;
it returns an experiment.Plan that experiment.run() carries out. On --resume the plan is read back
from plan.json, the single source of truth: flags that contradict it are an error, and an edited
space file changes nothing.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.config import UserError
from ..core.racing import DEFAULT_ALPHA
from ..tuning.base import prepare_base
from ..tuning.plan import Plan, RunOptions, SearchTrials, check_flags, check_race_flags, check_time_budget, reopen
from ..results.folders import experiment_dir, ranked_trials, write_csv, write_json
from ..results.tested import test_once
from ..core.spaces import SearchSpec, check_budget, check_rungs, find_space, load_space
from ..tuning.trials import trial_rows

QUICK = {"num_samples": 6, "max_epochs": 4, "subset": 10000}
QUICK_BIG_MODEL = {"subset": 1000, "resolution": 64}     # pretrained nets at 224 px are slow on a CPU
SEARCH_STAGE_FILE = "search.json"     # the search stage's summary when --cv-top selects the winner
BUDGETED_SAMPLES = 1000        # trials a --time-budget search may propose (the budget ends it first)
# Flags that define a search's plan: given again on --resume, each must agree with plan.json.
PLAN_FLAGS = ("num_samples", "max_epochs", "grace_period", "searcher", "quick", "subset", "data_dir", "weights",
              "seed", "time_budget", "max_failures", "gpus_per_trial", "cpus_per_trial", "cv_top", "k", "repeats",
              "study_feedback", "race", "race_min_splits", "race_alpha", "final", "tta")


@dataclass
class SearchOptions(RunOptions):
    num_samples: int | None = None
    max_epochs: int | None = None
    grace_period: float | None = None
    searcher: str | None = None
    study_feedback: str = "pruned"     # "complete": Ray's OptunaSearch as it is (bench search_quality's variant b)
    quick: bool = False
    cv_top: int | None = None          # cross-validate the N best configurations, retrain the winner, test it
    k: int = 5                         # with cv_top: folds
    repeats: int = 1                   # with cv_top: repeats of the K-fold split
    race: bool = True                  # with cv_top: racing over the splits (kfold.KFoldOptions)
    race_min_splits: int | None = None
    race_alpha: float = DEFAULT_ALPHA
    final: str | None = None           # with cv_top: retrain | bagging (None: the default, final_stage.resolved)
    tta: str | None = None             # none | flip: test-time augmentation of the final model


def plan_search(name: str, opts: SearchOptions) -> Plan:
    """Every check, before anything is written or started."""
    from ..core.finals import check_final
    check_final(opts.final, opts.tta, opts.cv_top, cv_top_known=not opts.resume)   # on --resume: in plan.json
    if opts.resume:
        return resumed_plan(name, opts)
    spec = load_space(name)
    b = spec.budget
    quick = dict(QUICK, **(QUICK_BIG_MODEL if spec.base.model != "simple_cnn" else {})) if opts.quick else {}

    def pick(flag: Any, key: str, from_spec: Any) -> Any:
        """A flag the user gave wins, then the --quick preset, then the search-space file."""
        return flag if flag is not None else quick.get(key, from_spec)

    max_epochs = pick(opts.max_epochs, "max_epochs", b.max_epochs)
    budget = dataclasses.replace(
        b, max_epochs=max_epochs,
        grace_period=pick(opts.grace_period, "grace_period", min(b.grace_period, max_epochs)),
        num_samples=pick(opts.num_samples, "num_samples", b.num_samples),
        time_budget_s=pick(opts.time_budget, "time_budget_s", b.time_budget_s),
        searcher=pick(opts.searcher, "searcher", b.searcher))
    if budget.time_budget_s is not None and opts.num_samples is None:
        # with a clock, the clock ends the search: keep proposing trials until it runs out
        budget = dataclasses.replace(budget, num_samples=max(budget.num_samples, BUDGETED_SAMPLES))
    check_budget(budget, "--")
    check_time_budget(budget.time_budget_s,
                      "--time-budget" if opts.time_budget is not None else f"{spec.source}: budget.time_budget_s")
    check_rungs(budget, spec.base.evals_per_epoch, "--")
    changes: dict[str, Any] = {"epochs": budget.max_epochs,
                               "subset": opts.subset if opts.subset is not None else quick.get("subset")}
    if "resolution" in quick and spec.base.mode != "scratch":
        changes["resolution"] = quick["resolution"]
    check_flags(opts, ("cv_top",))
    base, resources, data_dir = prepare_base(spec, opts, "search", **changes)
    if opts.cv_top is not None:
        from ..data.cache import check_folds
        check_folds(opts.k, opts.repeats, base)
        check_race_flags(opts, opts.k, opts.repeats)
    elif (opts.k, opts.repeats) != (5, 1):
        raise UserError("--k and --repeats choose the folds of --cv-top: add --cv-top N (or use `kfold`)")
    elif (opts.race, opts.race_min_splits, opts.race_alpha) != (True, None, DEFAULT_ALPHA):
        raise UserError("--no-race, --race-min-splits and --race-alpha choose the racing of --cv-top: add --cv-top N")
    spec, base, fitting = fit_search(dataclasses.replace(spec, budget=budget), base, opts)
    check_rungs(spec.budget, base.evals_per_epoch, "--")
    check_batches(spec, base)
    if opts.cv_top is not None:
        check_batches(spec, base, k=opts.k)
    spec = dataclasses.replace(spec, base=base.replace(seed=opts.seed))
    exp = experiment_dir(opts.results_dir, opts.name or spec.name, overwrite=opts.overwrite)
    opts = final_options(dataclasses.replace(opts, data_dir=data_dir, subset=base.subset), exp)
    from ..tuning.trainable import fault_injection
    return make_plan(spec, opts, exp, resources, fault_injection(), fitting.to_dict())


def fit_search(spec: SearchSpec, base, opts: SearchOptions):
    """The spec fitted to the smallest training split a trial sees (core/fitting.py): the hold-out's
    training part, or with --cv-top the smaller training part of a fold. The budget is scaled only
    when the trials train on every image (a --subset, or --quick's on a larger set, is a small run
    asked for) and neither --max-epochs nor --grace-period set it."""
    from ..core.fitting import fit_plan
    from ..data.cache import train_size
    n_train = train_size(base) if opts.cv_top is None else min(train_size(base), train_size(base, k=opts.k))
    given = {key for key in ("max_epochs", "grace_period") if getattr(opts, key) is not None}
    return fit_plan(spec, base, n_train, given=given, scale_budget=base.subset is None)


def check_batches(spec: SearchSpec, base, k: int | None = None) -> None:
    """The largest batch size the space can draw must fit the training images evals_per_epoch times
    (with k: the training part of a fold of the --cv-top stage)."""
    from ..data.cache import train_size
    from ..training.fit import check_rounds
    dist = spec.space.get("batch_size")
    largest = max(dist.values) if dist is not None else base.batch_size
    where = "space.batch_size" if dist is not None else "batch_size"
    check_rounds(train_size(base, k=k), largest, base.evals_per_epoch,
                 f"--cv-top with --k {k}: {where}" if k else where)


def resumed_plan(name: str, opts: SearchOptions) -> Plan:
    """The plan saved in plan.json, with only the flags that do not change it (address, dashboard,
    report, output) taken from this command line."""
    exp, saved, spec, opts = reopen(name, opts, find_space(name).stem, PLAN_FLAGS)
    if "race" not in saved["options"]:      # planned before racing existed: its --cv-top stage trains every split
        opts = dataclasses.replace(opts, race=False)
    opts = final_options(opts, exp, legacy=not {"final", "tta"} <= set(saved["options"]))
    return make_plan(spec, opts, exp, saved["resources"], saved.get("inject") or {}, saved.get("fitting"))


def final_options(opts: SearchOptions, exp: Path, legacy: bool = False) -> SearchOptions:
    """The options with --final / --tta resolved (the defaults filled in) as plan.json records them;
    `legacy`: a plan from before these flags. Bagging needs the CV stage's trial folders here."""
    from ..tuning.tuners import tune_path
    from .final_stage import check_bagging_storage, resolved
    final, tta = resolved(opts.final, opts.tta, opts.cv_top, legacy=legacy)
    check_bagging_storage(final, tune_path(exp, opts.ray))
    return dataclasses.replace(opts, final=final, tta=tta)


def make_plan(spec: SearchSpec, opts: SearchOptions, exp: Path, resources: dict[str, float],
              inject: dict[str, Any], fitting: dict[str, Any] | None = None) -> Plan:
    """fitting: what core/fitting.py changed (plan.json keeps it beside the fitted spec it explains)."""
    return Plan(exp=exp, opts=opts, trials=SearchTrials(spec, opts.seed, opts.study_feedback), resources=resources,
                time_budget=spec.budget.time_budget_s, phase="search", inject=inject, fitting=fitting,
                write_results=lambda results, phases, ray_facts: write_search_results(
                    spec, exp, resources, results, phases, ray_facts, test=opts.cv_top is None, tta=opts.tta),
                # with --cv-top the search is only the first stage: selection.py writes best.json
                summary_file="best.json" if opts.cv_top is None else SEARCH_STAGE_FILE)


def write_search_results(spec: SearchSpec, exp: Path, resources: dict[str, float], results, phases,
                         ray_facts: dict, test: bool = True, tta: str = "none") -> dict[str, Any]:
    """trials.csv and history.csv; then, unless a cross-validation stage follows (test=False), the
    best trial's model tested once: best_model.pt, test_predictions.json, best.json."""
    import pandas as pd
    import torch

    from ..core.trial import STATE_FILE

    rows, history = trial_rows(results, list(spec.space))
    trials = pd.DataFrame(rows)
    write_csv(exp / "trials.csv", trials.drop(columns=["path"], errors="ignore"))
    write_csv(exp / "history.csv", pd.DataFrame(history))
    ranked = ranked_trials(trials)
    if ranked.empty:
        raise UserError(f"{exp}: no trial finished successfully (see trials.csv for each trial's status and error)")
    best_row = ranked.iloc[0]
    best_result = next(r for r in results if r.path == best_row["path"])
    params = {k: best_result.config[k] for k in spec.space}     # exact types (the CSV row may hold 128.0)
    summary = {"experiment": exp.name, "search_space": spec.source, "best_trial": best_row["trial_id"],
               "best_config": params, "val_acc": float(best_row["last_val_acc"]), "epochs": float(best_row["epochs"]),
               "precision_used": best_row["precision_used"] or None,     # None: a run from before it was recorded
               "trials": len(trials), "status_counts": trials["status"].value_counts().to_dict(),
               "ray": ray_facts, "resources": resources}
    if not test:
        print_summary(trials, summary, list(spec.space))
        return summary
    cfg = spec.base.replace(**params)
    with best_result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    summary.update(test_once(exp, cfg, state=state, tta=tta))
    phases.done("test")
    summary.update(selected_by="validation", phases=phases.seconds)
    write_json(exp / "best.json", summary)
    print_summary(trials, summary, list(spec.space))
    return summary


def print_summary(trials, summary: dict[str, Any], searched: list[str]) -> None:
    cols = ["trial_id", "status", *searched, "last_val_acc", "epochs", "seconds"]
    top = trials.sort_values("last_val_acc", ascending=False, na_position="last")[cols]
    print()
    print(top.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    test = f" test_acc={summary['test_acc']:.4f}" if "test_acc" in summary else ""
    print(f"\n{summary['trials']} trials ({', '.join(f'{v} {k}' for k, v in summary['status_counts'].items())}); "
          f"best {summary['best_trial']}: val_acc={summary['val_acc']:.4f}{test}")
