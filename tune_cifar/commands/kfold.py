"""`kfold NAME --k K [--repeats R]`: how good is a configuration, and is it really better than another?

Splits: scikit-learn's RepeatedStratifiedKFold (seeded) over the training images (or --subset): J =
K x R (train, validation) splits, the same for every configuration, so configurations are compared
split by split with the corrected resampled t-test (stats.py). The test set is never touched.
Configurations: the space's default point, `--set key=value`, `--num-samples N` spread over the space
by Optuna's seeded QMCSampler (Sobol), or `--from-search EXP --top N` (the N best trials of a search).
Every (configuration, split) pair is one Ray Tune trial with the full epoch budget, so they run in
parallel and an interrupted run continues with --resume. Racing (on by default, `--no-race` off):
the configurations run split by split, and from split --race-min-splits on one significantly worse
than the best so far runs no more splits (core/racing.py decides, tuning/racing.py hands out the
trials); kfold.csv says how many splits each ran and after which it was dropped.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.config import TrainConfig, UserError, value_from_csv
from ..core.racing import DEFAULT_ALPHA, DEFAULT_MIN_SPLITS, RaceRule, race
from ..tuning.base import prepare_base
from ..tuning.plan import FoldTrials, Plan, RunOptions, check_flags, check_race_flags, check_time_budget, reopen
from ..results.folders import experiment_dir, find_experiment, ranked_trials, read_json, read_yaml, write_csv
from ..core.spaces import SearchSpec, check_value, find_space, load_space
from ..core.stats import compare_to_best, holdout_ratio
from ..core.trial import CANDIDATE, SPLIT, Status
from ..data.cache import check_folds
from ..tuning.trials import trial_rows

PLAN_FLAGS = ("k", "repeats", "epochs", "num_samples", "from_search", "top", "fixed", "subset", "data_dir",
              "weights", "seed", "time_budget", "max_failures", "gpus_per_trial", "cpus_per_trial", "race",
              "race_min_splits", "race_alpha")


@dataclass
class KFoldOptions(RunOptions):
    k: int = 5
    repeats: int = 1
    epochs: int | None = None
    num_samples: int | None = None
    from_search: str | None = None
    top: int = 3
    fixed: dict[str, Any] = field(default_factory=dict)
    race: bool = True                          # racing over the splits (--no-race: every split of every one)
    race_min_splits: int | None = None         # splits before the first drop (None: DEFAULT_MIN_SPLITS)
    race_alpha: float = DEFAULT_ALPHA          # drop at a Holm-adjusted one-sided p below this


def race_record(opts) -> dict[str, Any]:
    """The race settings as plan.json records them (what a --resume runs with)."""
    return {"on": bool(opts.race), "min_splits": opts.race_min_splits or DEFAULT_MIN_SPLITS,
            "alpha": float(opts.race_alpha)}


def draw_configs(spec: SearchSpec, n: int, seed: int) -> list[dict[str, Any]]:
    """The default point, then N - 1 points of a scrambled, seeded Sobol sequence over the space
    (Optuna's QMCSampler). For the handful of configurations a K-fold compares, a low-discrepancy
    sequence spreads them over every range (the learning rate's low and high ends included), where a
    few random draws bunch together. The enqueued default point is the study's first trial, from
    which QMCSampler reads the space; the Sobol points follow it."""
    import warnings

    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=seed)
    study = optuna.create_study(sampler=sampler, direction="maximize")
    study.enqueue_trial(spec.default_point())
    return [study.ask(spec.optuna_space()).params for _ in range(n)]


def configs_from_search(spec: SearchSpec, results_dir: Path, exp_name: str, top: int) -> list[dict[str, Any]]:
    import pandas as pd
    exp = Path(results_dir) / exp_name
    if not (exp / "trials.csv").is_file():
        raise UserError(f"--from-search {exp_name}: {exp}/trials.csv not found (run `search` first)")
    searched = read_yaml(exp / "spec.yaml")
    for key in ("model", "mode"):
        if searched["base"][key] != getattr(spec.base, key):
            raise UserError(f"--from-search {exp_name}: it searched {key}={searched['base'][key]}, "
                            f"not {getattr(spec.base, key)} of {spec.name}")
    ok = ranked_trials(pd.read_csv(exp / "trials.csv")).head(top)
    if ok.empty:
        raise UserError(f"--from-search {exp_name}: no successful trial in {exp}/trials.csv")
    keys = [k for k in searched["space"] if k in ok.columns]
    return [{k: value_from_csv(k, v) for k, v in row.items()} for row in ok[keys].to_dict("records")]


def plan_kfold(name: str, opts: KFoldOptions) -> Plan:
    if opts.resume:
        return resumed_plan(name, opts, f"kfold_{find_space(name).stem}")
    spec = load_space(name)
    sources = sum([bool(opts.fixed), opts.num_samples is not None, opts.from_search is not None])
    if sources > 1:
        raise UserError("choose one of --set, --num-samples and --from-search")
    check_flags(opts, ("num_samples", "top", "epochs"))
    check_time_budget(opts.time_budget)
    base, resources, data_dir = prepare_base(spec, opts, "kfold", epochs=opts.epochs or spec.budget.max_epochs,
                                             subset=opts.subset, seed=opts.seed, patience=0)
    check_folds(opts.k, opts.repeats, base)
    spec, base, fitting = fit_kfold(spec, base, opts)
    if opts.fixed:
        point = spec.default_point()
        for key, value in opts.fixed.items():
            point[key] = check_value(f"--set {key}", key, value, base)
        candidates = [point]
    elif opts.from_search:
        candidates = configs_from_search(spec, opts.results_dir, opts.from_search, opts.top)
    else:
        candidates = draw_configs(spec, opts.num_samples or 1, opts.seed)
    for c in candidates:
        base.replace(**c).check("kfold configuration")
    check_race_flags(opts, opts.k, opts.repeats)
    check_fold_batches(candidates, base, opts.k)
    exp = experiment_dir(opts.results_dir, opts.name or f"kfold_{spec.name}", overwrite=opts.overwrite)
    from ..tuning.trainable import fault_injection
    return make_plan(spec, dataclasses.replace(opts, data_dir=data_dir), base, candidates, exp, resources,
                     fault_injection(), fitting.to_dict())


def fit_kfold(spec: SearchSpec, base: TrainConfig, opts: KFoldOptions):
    """The space and epochs fitted to the smallest fold's training part (core/fitting.py), before the
    configurations are drawn from the space. --set batch_size / evals_per_epoch and --epochs are the
    user's and stay as given (check_fold_batches says when they cannot run); the epochs are scaled
    only when the folds are cut from every image (no --subset)."""
    from ..core.fitting import fit_plan
    from ..data.cache import train_size
    given = {key for key in ("batch_size", "evals_per_epoch") if key in opts.fixed}
    if opts.epochs is not None:
        given.add("max_epochs")
    batch = check_value("--set batch_size", "batch_size", opts.fixed["batch_size"], base) if "batch_size" in given \
        else None
    return fit_plan(spec, base, train_size(base, k=opts.k), given=given, scale_budget=base.subset is None,
                    batch_size=batch)


def plan_modes(model: str, opts: KFoldOptions) -> Plan:
    """`compare MODEL --k K`: the model's training modes as the configurations of one cross-validation,
    on the same splits. Each mode runs its search's best configuration when a finished search of it
    is in the results folder, else its space's default point, with its own resolution, epochs and
    fixed settings; `--set key=value` applies to every mode (resolution=32 on a CPU)."""
    from ..training.models import entry
    entry(model)
    if opts.resume:
        return resumed_plan(None, opts, f"compare_cv_{model}")
    if model == "simple_cnn":
        raise UserError("compare simple_cnn --k: simple_cnn has only the scratch mode, there is nothing to compare")
    configs, resources = [], None
    for mode in ("scratch", "frozen", "full"):
        spec = load_space(f"{model}_{mode}")
        base, res, data_dir = prepare_base(spec, opts, f"compare {model}", epochs=opts.epochs or spec.budget.max_epochs,
                                           subset=opts.subset, seed=opts.seed, patience=0)
        resources = resources or res
        searched = find_experiment(opts.results_dir, model, mode)
        point = read_json(searched / "best.json")["best_config"] if searched else spec.default_point()
        for key, value in opts.fixed.items():
            point[key] = check_value(f"--set {key}", key, value, base)
        print(f"{mode}: " + (f"the best configuration of {searched}" if searched else
                             f"the default point of {spec.source}"))
        configs.append(base.replace(**point).to_dict())
    differing = [k for k in configs[0] if any(c[k] != configs[0][k] for c in configs)]
    candidates = [{k: c[k] for k in differing} for c in configs]
    base = TrainConfig.from_dict(configs[0], where=f"compare {model}")
    check_folds(opts.k, opts.repeats, base)
    check_race_flags(opts, opts.k, opts.repeats)
    check_fold_batches(candidates, base, opts.k)
    exp = experiment_dir(opts.results_dir, opts.name or f"compare_cv_{model}", overwrite=opts.overwrite)
    from ..tuning.trainable import fault_injection
    return make_plan(load_space(f"{model}_scratch"), dataclasses.replace(opts, data_dir=data_dir), base, candidates,
                     exp, resources, fault_injection())


def check_fold_batches(candidates: list[dict[str, Any]], base: TrainConfig, k: int) -> None:
    from ..data.cache import train_size
    from ..training.fit import check_rounds
    for c in candidates:
        cfg = base.replace(**c)
        check_rounds(train_size(cfg, k=k), cfg.batch_size, cfg.evals_per_epoch, "kfold configuration")


def resumed_plan(name: str | None, opts: KFoldOptions, default_name: str) -> Plan:
    """The plan saved in plan.json (see experiment.reopen)."""
    exp, saved, spec, opts = reopen(name, opts, default_name, PLAN_FLAGS)
    if "race" not in saved:             # planned before racing existed: every split, as it was run
        opts = dataclasses.replace(opts, race=False)
    return make_plan(spec, opts, TrainConfig.from_dict(saved["base"], where=str(exp / "plan.json")),
                     saved["candidates"], exp, saved["resources"], saved.get("inject") or {}, saved.get("fitting"))


def cross_validate(spec: SearchSpec, base: TrainConfig, candidates: list[dict[str, Any]], exp: Path,
                   opts: KFoldOptions, resources: dict[str, Any], inject: dict[str, Any] | None = None,
                   fitting: dict[str, Any] | None = None):
    """Cross-validate `candidates` (hyper-parameters over `base`) on opts.k x opts.repeats splits in
    the experiment folder `exp`, continued where it stopped (Tune's saved state; a folder killed
    before Tune saved anything starts again), and return its kfold.csv table. The test set is never
    touched. What `search --cv-top` calls for its shortlist."""
    import pandas as pd

    from ..tuning.runner import run
    from ..tuning.tuners import can_restore
    if not (exp / "kfold_summary.json").exists():
        restorable = (exp / "plan.json").exists() and can_restore(exp, opts.ray)
        opts = dataclasses.replace(opts, resume=restorable, overwrite=exp.exists() and not restorable)
        run(make_plan(spec, opts, base, candidates, exp, resources, inject or {}, fitting))
    return pd.read_csv(exp / "kfold.csv").fillna({"reason": ""})


def make_plan(spec: SearchSpec, opts: KFoldOptions, base: TrainConfig, candidates: list[dict[str, Any]], exp: Path,
              resources: dict[str, float], inject: dict[str, Any], fitting: dict[str, Any] | None = None) -> Plan:
    """fitting: what core/fitting.py changed (plan.json keeps it beside the fitted spec and base)."""
    trials = FoldTrials(spec, base, candidates, opts.k, opts.repeats, race_record(opts))
    return Plan(exp=exp, opts=opts, trials=trials,
                resources=resources, time_budget=opts.time_budget, phase="folds", inject=inject, fitting=fitting,
                write_results=lambda results, phases, ray_facts: write_kfold_results(
                    exp, candidates, opts.k, opts.repeats, results, ray_facts, trials.rule, trials.race),
                summary_file="kfold_summary.json")


def fold_rows(results, candidates: list[dict[str, Any]], k: int):
    """kfold_folds.csv: one row per (configuration, split) trial of a ResultGrid (a trial is completed
    when it ran its own candidate's rounds: trials.max_rounds)."""
    import pandas as pd
    rows, _ = trial_rows(results, [CANDIDATE, SPLIT])
    folds = []
    for r in rows:
        split = int(r[SPLIT])
        cand = candidates[int(r[CANDIDATE])]
        status = r["status"]
        folds.append({"config": int(r[CANDIDATE]), "fold": split, "repeat": split // k, **cand,
                      "accuracy": r["last_val_acc"], "loss": r["last_val_loss"], "epochs": r["epochs"],
                      "seconds": r["seconds"], "status": status, "node": r["node"], "error": r["error"]})
    return pd.DataFrame(folds).sort_values(["config", "fold"])


def cv_table(folds, candidates: list[dict[str, Any]], k: int, repeats: int, rule: RaceRule | None = None):
    """kfold.csv: per configuration, the mean over its J = K x R splits (those it ran), its 95 %
    interval and the paired comparison with the best configuration (stats.compare_to_best);
    splits_done, and with racing dropped_after (the race replayed from the folds: core.racing.race,
    the decision the racing searcher took). The best is one that was not dropped."""
    import pandas as pd

    searched = sorted({key for c in candidates for key in c})
    splits = k * repeats
    ok = folds[folds["status"] == Status.COMPLETED.value]
    acc = (ok.pivot(index="config", columns="fold", values="accuracy").astype(float)
           .reindex(index=range(len(candidates)), columns=range(splits)))
    ran = folds[folds["status"] != Status.NOT_RUN.value]
    finished = (ran.assign(ran=True).pivot(index="config", columns="fold", values="ran")
                .reindex(index=range(len(candidates)), columns=range(splits)).fillna(False).astype(bool))
    dropped = race(acc, finished, rule).dropped if rule is not None else {}
    stats = compare_to_best(acc, holdout_ratio(k), contenders=[i not in dropped for i in range(len(candidates))])
    rows = []
    for i, cand in enumerate(candidates):
        row = {"config": i, **{key: cand.get(key) for key in searched}, "k": k, "repeats": repeats,
               "folds_ok": int(stats.loc[i, "n_splits"]), "splits_done": int(finished.loc[i].sum()),
               "dropped_after": dropped.get(i, pd.NA)}
        row.update(stats.loc[i].drop("n_splits").to_dict())
        row.update(min_acc=acc.loc[i].min(), max_acc=acc.loc[i].max())
        row.update({f"fold_{f}": acc.loc[i, f] for f in range(splits)})
        rows.append(row)
    return pd.DataFrame(rows).set_index("config").loc[stats.index].reset_index()


def print_cv_table(table, title: str = "") -> None:
    from ..core.stats import ASSUMPTION, standing
    searched = [c for c in table.columns if c not in CV_COLUMNS and not c.startswith("fold_")]
    shown = table.assign(verdict=table.apply(standing, axis=1))
    if "dropped_after" in shown:
        shown["dropped_after"] = shown["dropped_after"].astype(object).where(shown["dropped_after"].notna(), "-")
    cols = ["config", *[c for c in searched if c != "config"], "splits_done", "dropped_after", "folds_ok",
            "mean_acc", "ci_low", "ci_high", "diff_vs_best", "p_holm", "verdict"]
    cols = [c for c in cols if c in shown.columns]      # a kfold.csv from before racing has no race columns
    print(f"\n{title}" if title else "")
    print(shown[cols].to_string(index=False, float_format=lambda x: f"{x:.4g}", na_rep="-"))
    best = table.iloc[0]
    if best["mean_acc"] == best["mean_acc"] and best["folds_ok"] >= 2:
        print(f"\nbest configuration {int(best['config'])}: accuracy {best['mean_acc']:.4f} "
              f"(95 % interval {best['ci_low']:.4f} to {best['ci_high']:.4f}) over {int(best['folds_ok'])} of "
              f"{int(best['k']) * int(best['repeats'])} splits")
    elif best["mean_acc"] == best["mean_acc"]:
        print(f"\nbest configuration {int(best['config'])}: accuracy {best['mean_acc']:.4f} on "
              f"{int(best['folds_ok'])} split (no interval: {best['reason']})")
    print(ASSUMPTION)


CV_COLUMNS = {"config", "k", "repeats", "folds_ok", "mean_acc", "std_acc", "ci_low", "ci_high", "diff_vs_best",
              "p_vs_best", "p_holm", "p_wilcoxon", "tied_with_best", "reason", "min_acc", "max_acc", "splits_done",
              "dropped_after"}


def write_kfold_results(exp: Path, candidates: list[dict[str, Any]], k: int, repeats: int,
                        results, ray_facts: dict, rule: RaceRule | None = None,
                        racing: dict[str, Any] | None = None) -> dict[str, Any]:
    folds = fold_rows(results, candidates, k)
    write_csv(exp / "kfold_folds.csv", folds)
    table = cv_table(folds, candidates, k, repeats, rule)
    write_csv(exp / "kfold.csv", table)
    print_cv_table(table)
    counts = fold_trainings(table, k * repeats)
    print(trainings_line(counts))
    return {"ray": ray_facts, "k": k, "repeats": repeats, "configurations": len(candidates),
            "best_configuration": int(table.iloc[0]["config"]), "race": racing, **counts}


def fold_trainings(table, splits: int) -> dict[str, Any]:
    """How many fold trainings ran against the full J x configurations, and who was dropped when."""
    ran = int(table["splits_done"].sum())
    full = splits * len(table)
    import pandas as pd
    dropped = {int(r["config"]): int(r["dropped_after"]) for _, r in table.iterrows() if pd.notna(r["dropped_after"])}
    return {"fold_trainings": ran, "fold_trainings_full": full, "fold_trainings_saved": full - ran,
            "dropped_after": dropped}


RACE_KEYS = ("race", "fold_trainings", "fold_trainings_full", "fold_trainings_saved", "dropped_after")


def race_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The race's part of a kfold_summary.json (for best.json of search --cv-top)."""
    return {key: summary[key] for key in RACE_KEYS if key in summary}


def trainings_line(counts: dict[str, Any]) -> str:
    """One line: fold trainings run of the full count, and the drops."""
    saved = counts["fold_trainings_saved"]
    share = f" ({100 * saved / counts['fold_trainings_full']:.0f} % saved)" if counts["fold_trainings_full"] else ""
    drops = ", ".join(f"config {c} after {n} splits" for c, n in sorted(counts["dropped_after"].items()))
    return (f"fold trainings: {counts['fold_trainings']} of {counts['fold_trainings_full']} (K x R x configurations)"
            f"{share}" + (f"; dropped by the race: {drops}" if drops else ""))
