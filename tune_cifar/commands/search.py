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
from typing import Any, Callable

from ..core.config import UserError
from ..tuning.runner import (
    Plan,
    RunOptions,
    check_time_budget,
    prepare_base,
    recorded_options,
    reopen,
    run_config,
)
from ..results.folders import experiment_dir, ranked_trials, write_csv, write_json, write_torch
from ..core.spaces import SearchSpec, asha_rounds, check_budget, check_rungs, find_space, load_space
from ..tuning.trials import trial_rows

METRIC, MODE = "val_acc", "max"
QUICK = {"num_samples": 6, "max_epochs": 4, "subset": 10000}
QUICK_BIG_MODEL = {"subset": 1000, "resolution": 64}     # pretrained nets at 224 px are slow on a CPU
SEARCH_STAGE_FILE = "search.json"     # the search stage's summary when --cv-top selects the winner
BUDGETED_SAMPLES = 1000        # trials a --time-budget search may propose (the budget ends it first)
# Flags that define a search's plan: given again on --resume, each must agree with plan.json.
PLAN_FLAGS = ("num_samples", "max_epochs", "grace_period", "searcher", "quick", "subset", "data_dir", "weights",
              "seed", "time_budget", "max_failures", "gpus_per_trial", "cpus_per_trial", "cv_top", "k", "repeats",
              "study_feedback", "final", "tta")


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
    if opts.cv_top is not None and opts.cv_top < 1:
        raise UserError(f"--cv-top={opts.cv_top} must be at least 1")
    base, resources, data_dir = prepare_base(spec, opts, "search", **changes)
    check_batches(spec, base)
    if opts.cv_top is not None:
        from .kfold import check_folds
        check_folds(opts.k, opts.repeats, base)
        check_batches(spec, base, k=opts.k)
    elif (opts.k, opts.repeats) != (5, 1):
        raise UserError("--k and --repeats choose the folds of --cv-top: add --cv-top N (or use `kfold`)")
    spec = dataclasses.replace(spec, base=base.replace(seed=opts.seed), budget=budget)
    exp = experiment_dir(opts.results_dir, opts.name or spec.name, overwrite=opts.overwrite)
    opts = final_options(dataclasses.replace(opts, data_dir=data_dir, subset=base.subset), exp)
    from ..tuning.trainable import fault_injection
    return make_plan(spec, opts, exp, resources, fault_injection())


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
    opts = final_options(opts, exp, legacy=not {"final", "tta"} <= set(saved["options"]))
    return make_plan(spec, opts, exp, saved["resources"], saved.get("inject") or {})


def final_options(opts: SearchOptions, exp: Path, legacy: bool = False) -> SearchOptions:
    """The options with --final / --tta resolved (the defaults filled in) as plan.json records them;
    `legacy`: a plan from before these flags. Bagging needs the CV stage's trial folders here."""
    from ..tuning.runner import tune_path
    from .final_stage import check_bagging_storage, resolved
    final, tta = resolved(opts.final, opts.tta, opts.cv_top, legacy=legacy)
    check_bagging_storage(final, tune_path(exp, opts.ray))
    return dataclasses.replace(opts, final=final, tta=tta)


def make_plan(spec: SearchSpec, opts: SearchOptions, exp: Path, resources: dict[str, float],
              inject: dict[str, Any]) -> Plan:
    options = recorded_options(opts)
    return Plan(exp=exp, opts=opts, spec_record=spec.to_dict(),
                plan_record={"kind": "search", "spec": spec.to_dict(), "options": options, "resources": resources,
                             "inject": inject},
                resources=resources, time_budget=spec.budget.time_budget_s, phase="search",
                make_tuner=lambda trainable, seconds: make_tuner(spec, opts, exp, inject, trainable, seconds),
                write_results=lambda results, phases, ray_facts: write_search_results(
                    spec, exp, resources, results, phases, ray_facts, test=opts.cv_top is None, tta=opts.tta),
                # with --cv-top the search is only the first stage: selection.py writes best.json
                summary_file="best.json" if opts.cv_top is None else SEARCH_STAGE_FILE)


def make_tuner(spec: SearchSpec, opts: SearchOptions, exp: Path, inject: dict[str, Any], trainable,
               time_budget_s: float | None):
    import optuna
    import ray
    from ray import tune

    from ..tuning.searchers import make_scheduler, make_search_alg, search_callbacks, tune_space
    from ..tuning.trainable import trial_dirname

    max_t, grace = asha_rounds(spec.budget, spec.base.evals_per_epoch)
    storage = optuna.storages.RDBStorage(f"sqlite:///{(exp / 'optuna.db').resolve()}")
    # no more trials pending or running than one per CPU of the cluster, plus one ready to start
    max_live = int(ray.cluster_resources().get("CPU", 1)) + 1
    search_alg = make_search_alg(spec.budget.searcher, spec.optuna_space(), [spec.default_point()], METRIC, MODE,
                                 opts.seed, storage, exp.name, max_t, feedback=opts.study_feedback,
                                 max_live=max_live)
    constants = spec.base.to_dict()
    for k in spec.space:
        constants.pop(k, None)
    if spec.budget.searcher == "random":
        constants.update(tune_space(spec.optuna_space()))     # Tune's own sampler draws from the param_space
    if inject:
        constants["_inject"] = inject
    return tune.Tuner(
        trainable, param_space=constants,
        tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=search_alg,
                                    scheduler=make_scheduler(max_t, grace, spec.budget.reduction_factor,
                                                             spec.budget.brackets),
                                    num_samples=spec.budget.num_samples, reuse_actors=True,
                                    time_budget_s=time_budget_s, trial_dirname_creator=trial_dirname),
        run_config=run_config(exp, opts, search_callbacks(search_alg)))


def write_search_results(spec: SearchSpec, exp: Path, resources: dict[str, float], results, phases,
                         ray_facts: dict, test: bool = True, tta: str = "none") -> dict[str, Any]:
    """trials.csv and history.csv; then, unless a cross-validation stage follows (test=False), the
    best trial's model tested once: best_model.pt, test_predictions.json, best.json."""
    import pandas as pd
    import torch

    from ..tuning.trainable import STATE_FILE

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


def test_once(exp: Path, cfg, state: dict[str, Any] | None = None, model=None, kind: str = "best_trial",
              tta: str = "none", members: Callable[[int], list] | None = None) -> dict[str, Any]:
    """The experiment's one look at the test set: the final model (training/final.py) of `kind` with
    test-time augmentation `tta` evaluated once, its members `members(num_classes)`, else the one
    `model`, or the one rebuilt from a trial's checkpoint `state`; writes best_model.pt (the final
    predictor) and test_predictions.json."""
    from ..data.cache import device_data
    from ..training.final import FinalModel, Member
    from ..training.fit import evaluate_test, model_from_state

    data = device_data(cfg.replace(threads=None, device="auto"))
    if members is not None:
        chosen = members(len(data.classes))
    else:
        chosen = [Member(cfg, model if model is not None else model_from_state(cfg, state, len(data.classes)))]
    final = FinalModel(kind, tta or "none", chosen)
    metrics = evaluate_test(final.predictor(), cfg.replace(device="auto"), data)
    write_torch(exp / "best_model.pt", final.record(list(data.classes)))
    write_json(exp / "test_predictions.json", {"predictions": metrics.pop("predictions"),
                                               "labels": data.test.y.cpu().tolist(), "classes": list(data.classes)})
    return {"test_acc": metrics["test_acc"], "test_loss": metrics["test_loss"], "config": cfg.to_dict(),
            "classes": list(data.classes), "test_source": data.test_source, "checkpoint": "best_model.pt",
            "per_class": metrics["per_class"], "confusion_matrix": metrics["confusion_matrix"],
            "final": final.summary()}


def print_summary(trials, summary: dict[str, Any], searched: list[str]) -> None:
    cols = ["trial_id", "status", *searched, "last_val_acc", "epochs", "seconds"]
    top = trials.sort_values("last_val_acc", ascending=False, na_position="last")[cols]
    print()
    print(top.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    test = f" test_acc={summary['test_acc']:.4f}" if "test_acc" in summary else ""
    print(f"\n{summary['trials']} trials ({', '.join(f'{v} {k}' for k, v in summary['status_counts'].items())}); "
          f"best {summary['best_trial']}: val_acc={summary['val_acc']:.4f}{test}")
