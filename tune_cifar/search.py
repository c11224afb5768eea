"""`search NAME`: Ray Tune + OptunaSearch (TPE) + ASHA over a search space, then the best trial's test.

plan_search() checks everything (space, flags, data, weights, results folder) and touches nothing;
run_search() then creates the experiment folder, starts Ray, runs or resumes the Tuner, and writes
trials.csv, history.csv, best.json and best_model.pt through results.py.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import UserError
from .results import experiment_dir, read_json, write_csv, write_json, write_torch
from .spaces import Budget, SearchSpec, asha_rounds, check_budget, check_rungs, load_space
from .tuning import (
    Phases,
    RunOptions,
    check_time_budget,
    fault_injection,
    prepare_base,
    print_phases,
    ranked_trials,
    run_config,
    trial_rows,
    tune_experiment,
)

METRIC, MODE = "val_acc", "max"
QUICK = {"num_samples": 6, "max_epochs": 4, "subset": 10000}
QUICK_BIG_MODEL = {"subset": 1000, "resolution": 64}     # pretrained nets at 224 px are slow on a CPU
BUDGETED_SAMPLES = 1000        # trials a --time-budget search may propose (the budget ends it first)


@dataclass
class SearchOptions(RunOptions):
    num_samples: int | None = None
    max_epochs: int | None = None
    grace_period: float | None = None
    quick: bool = False


@dataclass
class SearchPlan:
    spec: SearchSpec
    opts: SearchOptions
    exp: Path
    resources: dict[str, float]
    inject: dict[str, Any]

def plan_search(name: str, opts: SearchOptions) -> SearchPlan:
    """Every check, before anything is written or started."""
    spec = load_space(name)
    if opts.resume:
        exp = experiment_dir(opts.results_dir, opts.name or spec.name, resume=True)
        saved = read_json(exp / "plan.json")
        opts = dataclasses.replace(opts, **{k: v for k, v in saved["options"].items()
                                            if k in ("num_samples", "max_epochs", "grace_period", "subset",
                                                     "data_dir", "seed", "time_budget", "max_failures")})
    b = spec.budget
    quick = dict(QUICK, **(QUICK_BIG_MODEL if spec.base.model != "simple_cnn" else {})) if opts.quick else {}
    def pick(flag: Any, key: str, from_spec: Any) -> Any:
        """A flag the user gave wins, then the --quick preset, then the search-space file."""
        return flag if flag is not None else quick.get(key, from_spec)

    max_epochs = pick(opts.max_epochs, "max_epochs", b.max_epochs)
    budget = Budget(max_epochs=max_epochs,
                    grace_period=pick(opts.grace_period, "grace_period", min(b.grace_period, max_epochs)),
                    reduction_factor=b.reduction_factor,
                    num_samples=pick(opts.num_samples, "num_samples", b.num_samples),
                    time_budget_s=pick(opts.time_budget, "time_budget_s", b.time_budget_s))
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
    base, resources, data_dir = prepare_base(spec, opts, "search", **changes)
    spec = dataclasses.replace(spec, base=base, budget=budget)
    exp = experiment_dir(opts.results_dir, opts.name or spec.name, resume=opts.resume, overwrite=opts.overwrite)
    return SearchPlan(spec, dataclasses.replace(opts, data_dir=data_dir), exp, resources, fault_injection())


def make_tuner_factory(plan: SearchPlan, trainable):
    def make(time_budget_s: float | None):
        import optuna
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler
        from ray.tune.search.optuna import OptunaSearch

        from .trainable import trial_dirname

        spec, opts = plan.spec, plan.opts
        max_t, grace = asha_rounds(spec.budget, spec.base.evals_per_epoch)
        storage = optuna.storages.RDBStorage(f"sqlite:///{(plan.exp / 'optuna.db').resolve()}")
        searcher = OptunaSearch(space=spec.optuna_space(), metric=METRIC, mode=MODE,
                                points_to_evaluate=[spec.default_point()], storage=storage,
                                study_name=plan.exp.name, seed=opts.seed)
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=grace,
                                  reduction_factor=spec.budget.reduction_factor)
        constants = spec.base.replace(seed=opts.seed).to_dict()
        for k in spec.space:
            constants.pop(k, None)
        if plan.inject:
            constants["_inject"] = plan.inject
        return tune.Tuner(
            trainable, param_space=constants,
            tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=searcher, scheduler=scheduler,
                                        num_samples=spec.budget.num_samples, reuse_actors=True,
                                        time_budget_s=time_budget_s, trial_dirname_creator=trial_dirname),
            run_config=run_config(plan.exp, opts))
    return make


def trainable_for(resources: dict[str, float]):
    from ray import tune

    from .trainable import run_trial
    return tune.with_resources(run_trial, resources)


def run_search(plan: SearchPlan) -> dict[str, Any]:
    spec, opts, exp = plan.spec, plan.opts, plan.exp
    trainable = trainable_for(plan.resources)
    plan_file = {"options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items() if k != "ray"},
                 "resources": plan.resources}
    results, ray_facts, phases = tune_experiment(
        exp, opts, spec.to_dict(), plan_file, make_tuner_factory(plan, trainable), trainable,
        spec.budget.time_budget_s, "search")
    summary = write_search_results(plan, results, phases, ray_facts)
    if opts.report:
        from .report import write_report
        write_report(exp)
        phases.done("report")
    summary["phases"] = phases.seconds
    summary["wall_s"] = round(phases.elapsed(), 1)
    write_json(exp / "best.json", summary)
    print_phases(phases, spec.budget.time_budget_s)
    print(f"test_acc={summary['test_acc']:.4f}")
    return summary


def write_search_results(plan: SearchPlan, results, phases: Phases, ray_facts: dict) -> dict[str, Any]:
    import pandas as pd
    import torch

    from .data import load_for
    from .train import evaluate_test, model_from_state
    from .trainable import STATE_FILE

    spec, exp = plan.spec, plan.exp
    max_t, _ = asha_rounds(spec.budget, spec.base.evals_per_epoch)
    rows, history = trial_rows(results, list(spec.space), max_t)
    trials = pd.DataFrame(rows)
    write_csv(exp / "trials.csv", trials.drop(columns=["path"], errors="ignore"))
    write_csv(exp / "history.csv", pd.DataFrame(history))
    ranked = ranked_trials(trials)
    if ranked.empty:
        raise UserError(f"{exp}: no trial finished successfully (see trials.csv for each trial's status and error)")
    best_row = ranked.iloc[0]
    best_result = next(r for r in results if r.path == best_row["path"])
    params = {k: best_result.config[k] for k in spec.space}     # exact types (the CSV row may hold 128.0)
    cfg = spec.base.replace(**params, seed=plan.opts.seed)
    with best_result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
    model = model_from_state(cfg, state)
    data = load_for(cfg.replace(threads=None, device="auto"))
    metrics = evaluate_test(model, cfg.replace(device="auto"), data)
    phases.done("test")
    write_torch(exp / "best_model.pt", {"model": model.state_dict(), "config": cfg.to_dict(),
                                        "classes": list(data.classes)})
    write_json(exp / "test_predictions.json", {"predictions": metrics.pop("predictions"),
                                               "labels": data.test.y.cpu().tolist(), "classes": list(data.classes)})
    summary = {"experiment": exp.name, "search_space": spec.source, "best_trial": best_row["trial_id"],
               "best_config": params, "val_acc": float(best_row["last_val_acc"]),
               "test_acc": metrics["test_acc"], "test_loss": metrics["test_loss"],
               "epochs": float(best_row["epochs"]), "config": cfg.to_dict(),
               "trials": len(trials), "status_counts": trials["status"].value_counts().to_dict(),
               "checkpoint": "best_model.pt", "ray": ray_facts, "resources": plan.resources, "phases": phases.seconds,
               "per_class": metrics["per_class"], "confusion_matrix": metrics["confusion_matrix"]}
    write_json(exp / "best.json", summary)
    print_summary(trials, summary, list(spec.space))
    return summary


def print_summary(trials, summary: dict[str, Any], searched: list[str]) -> None:
    cols = ["trial_id", "status", *searched, "last_val_acc", "epochs", "seconds"]
    top = trials.sort_values("last_val_acc", ascending=False, na_position="last")[cols]
    print()
    print(top.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    print(f"\n{summary['trials']} trials ({', '.join(f'{v} {k}' for k, v in summary['status_counts'].items())}); "
          f"best {summary['best_trial']}: val_acc={summary['val_acc']:.4f} test_acc={summary['test_acc']:.4f}")
