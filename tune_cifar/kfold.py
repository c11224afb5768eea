"""`kfold NAME --k K`: how robust is a configuration? Mean +- std of validation accuracy over K folds.

Folds: scikit-learn's StratifiedKFold (shuffled, seeded) over the training images (or --subset);
the test set is never touched. Configurations: the space's default point, `--set key=value`,
`--num-samples N` drawn from the space by Optuna's seeded RandomSampler, or `--from-search EXP
--top N` (the N best trials of a finished search). Every (configuration, fold) pair is one Ray Tune
trial with the full epoch budget (no early stopping across folds), so they run in parallel and an
interrupted run continues with --resume.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import TrainConfig, UserError, typed
from .results import experiment_dir, read_json, write_csv, write_json
from .spaces import SearchSpec, check_value, load_space
from .tuning import (
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


@dataclass
class KFoldOptions(RunOptions):
    k: int = 5
    epochs: int | None = None
    num_samples: int | None = None
    from_search: str | None = None
    top: int = 3
    fixed: dict[str, Any] = field(default_factory=dict)


@dataclass
class KFoldPlan:
    spec: SearchSpec
    opts: KFoldOptions
    base: TrainConfig
    candidates: list[dict[str, Any]]
    exp: Path
    resources: dict[str, float]
    inject: dict[str, Any]


def draw_configs(spec: SearchSpec, n: int, seed: int) -> list[dict[str, Any]]:
    """N seeded random draws from the space (Optuna's RandomSampler; the first is the default point)."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed), direction="maximize")
    draws = [spec.default_point()]
    while len(draws) < n:
        draws.append(study.ask(spec.optuna_space()).params)
    return draws


def configs_from_search(spec: SearchSpec, results_dir: Path, exp_name: str, top: int) -> list[dict[str, Any]]:
    import pandas as pd
    import yaml
    exp = Path(results_dir) / exp_name
    if not (exp / "trials.csv").is_file():
        raise UserError(f"--from-search {exp_name}: {exp}/trials.csv not found (run `search` first)")
    searched = yaml.safe_load((exp / "spec.yaml").read_text())
    for key in ("model", "mode"):
        if searched["base"][key] != getattr(spec.base, key):
            raise UserError(f"--from-search {exp_name}: it searched {key}={searched['base'][key]}, "
                            f"not {getattr(spec.base, key)} of {spec.name}")
    trials = pd.read_csv(exp / "trials.csv")
    ok = ranked_trials(trials).head(top)
    if ok.empty:
        raise UserError(f"--from-search {exp_name}: no successful trial in {exp}/trials.csv")
    keys = [k for k in searched["space"] if k in ok.columns]
    return [{k: typed(k, v) for k, v in row.items()} for row in ok[keys].to_dict("records")]


def plan_kfold(name: str, opts: KFoldOptions) -> KFoldPlan:
    import numpy as np
    spec = load_space(name)
    if opts.resume:
        exp = experiment_dir(opts.results_dir, opts.name or f"kfold_{spec.name}", resume=True)
        saved = read_json(exp / "plan.json")
        return KFoldPlan(spec, dataclasses.replace(opts, k=saved["k"]),
                         TrainConfig.from_dict(saved["base"], where=str(exp / "plan.json")),
                         saved["candidates"], exp, saved["resources"], fault_injection())
    if opts.k < 2:
        raise UserError(f"--k={opts.k}: K-fold needs at least 2 folds")
    sources = sum([bool(opts.fixed), opts.num_samples is not None, opts.from_search is not None])
    if sources > 1:
        raise UserError("choose one of --set, --num-samples and --from-search")
    if opts.num_samples is not None and opts.num_samples < 1:
        raise UserError(f"--num-samples={opts.num_samples} must be at least 1")
    if opts.top < 1:
        raise UserError(f"--top={opts.top} must be at least 1")
    if opts.epochs is not None and opts.epochs < 1:
        raise UserError(f"--epochs={opts.epochs} must be at least 1")
    check_time_budget(opts.time_budget)
    base, resources, _ = prepare_base(spec, opts, "kfold", epochs=opts.epochs or spec.budget.max_epochs,
                                      subset=opts.subset, seed=opts.seed, patience=0)

    if opts.fixed:
        point = spec.default_point()
        for key, value in opts.fixed.items():
            check_value(f"--set {key}", key, value, base)
            point[key] = value
        candidates = [point]
    elif opts.from_search:
        candidates = configs_from_search(spec, opts.results_dir, opts.from_search, opts.top)
    else:
        candidates = draw_configs(spec, opts.num_samples or 1, opts.seed)
    for c in candidates:
        base.replace(**c).check("kfold configuration")

    from .data import stratified_subset, training_labels
    labels = training_labels(base)
    pool = labels[stratified_subset(labels, base.subset, base.split_seed)] if base.subset else labels
    smallest = int(np.bincount(pool).min())
    if opts.k > smallest:
        raise UserError(f"--k={opts.k} is larger than the {smallest} images of the rarest class: "
                        "use fewer folds or a larger --subset")
    exp = experiment_dir(opts.results_dir, opts.name or f"kfold_{spec.name}", overwrite=opts.overwrite)
    return KFoldPlan(spec, opts, base, candidates, exp, resources, fault_injection())


def make_tuner_factory(plan: KFoldPlan, trainable):
    def make(time_budget_s: float | None):
        from ray import tune

        from .trainable import trial_dirname
        constants: dict[str, Any] = plan.base.to_dict()
        constants.update(_candidates=plan.candidates, _k=plan.opts.k,
                         _candidate=tune.grid_search(list(range(len(plan.candidates)))),
                         _fold_index=tune.grid_search(list(range(plan.opts.k))))
        if plan.inject:
            constants["_inject"] = plan.inject
        return tune.Tuner(
            trainable, param_space=constants,
            tune_config=tune.TuneConfig(reuse_actors=True, time_budget_s=time_budget_s,
                                        trial_dirname_creator=trial_dirname),
            run_config=run_config(plan.exp, plan.opts))
    return make


def run_kfold(plan: KFoldPlan) -> Any:
    from ray import tune

    from .trainable import run_trial
    opts, exp = plan.opts, plan.exp
    trainable = tune.with_resources(run_trial, plan.resources)
    spec_file = {"kind": "kfold", "k": opts.k, **plan.spec.to_dict(), "base": plan.base.to_dict(),
                 "candidates": plan.candidates}
    plan_file = {"k": opts.k, "base": plan.base.to_dict(), "candidates": plan.candidates, "resources": plan.resources}
    results, ray_facts, phases = tune_experiment(exp, opts, spec_file, plan_file, make_tuner_factory(plan, trainable),
                                                 trainable, opts.time_budget, "folds")
    table = write_kfold_results(plan, results)
    if opts.report:
        from .report import write_report
        write_report(exp)
        phases.done("report")
    write_json(exp / "kfold_summary.json", {"phases": phases.seconds, "ray": ray_facts, "k": opts.k,
                                            "configurations": len(plan.candidates)})
    print_phases(phases, opts.time_budget)
    return table


def write_kfold_results(plan: KFoldPlan, results):
    import pandas as pd

    k = plan.opts.k
    searched = sorted({key for c in plan.candidates for key in c})
    rows, _ = trial_rows(results, ["_candidate", "_fold_index"], plan.base.epochs * plan.base.evals_per_epoch)
    folds = []
    for r in rows:
        cand = plan.candidates[int(r["_candidate"])]
        folds.append({"config": int(r["_candidate"]), "fold": int(r["_fold_index"]), **cand,
                      "accuracy": r["last_val_acc"], "loss": r["last_val_loss"], "epochs": r["epochs"],
                      "seconds": r["seconds"], "status": r["status"], "node": r["node"], "error": r["error"]})
    folds_df = pd.DataFrame(folds).sort_values(["config", "fold"])
    write_csv(plan.exp / "kfold_folds.csv", folds_df)

    table = []
    for i, cand in enumerate(plan.candidates):
        mine = folds_df[(folds_df["config"] == i) & (folds_df["status"] == "completed")]
        acc = mine.set_index("fold")["accuracy"].astype(float)
        row = {"config": i, **{key: cand.get(key) for key in searched}, "k": k, "folds_ok": len(acc),
               "mean_acc": acc.mean() if len(acc) else None,
               "std_acc": acc.std(ddof=1) if len(acc) > 1 else None,
               "min_acc": acc.min() if len(acc) else None, "max_acc": acc.max() if len(acc) else None}
        row.update({f"fold_{f}": acc.get(f) for f in range(k)})
        table.append(row)
    table_df = pd.DataFrame(table).sort_values("mean_acc", ascending=False, na_position="last")
    write_csv(plan.exp / "kfold.csv", table_df)
    print()
    print(table_df[["config", *searched, "k", "mean_acc", "std_acc", "min_acc", "max_acc"]]
          .to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    best = table_df.iloc[0]
    if best["mean_acc"] is not None and best["mean_acc"] == best["mean_acc"]:
        print(f"\nbest configuration {int(best['config'])}: accuracy {best['mean_acc']:.4f} "
              f"+- {(best['std_acc'] or 0):.4f} over {int(best['folds_ok'])} of {k} folds")
    return table_df
