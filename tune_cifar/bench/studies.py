"""The studies `bench --only` runs besides the acceptance parts: what a CPU buys in 15 minutes, the
search's quality against its alternatives at equal wall-clock budget, and where ASHA's rungs can
judge. Each is one code path, searches through the CLI (parts.search).

cpu_budget  `search simple_cnn --time-budget 900` on the full data set: trials and test accuracy.
search_quality  equal wall-clock budget, same data, several seeds: (a) TPE + ASHA with the truthful
    study (the default), (b) TPE + ASHA with Ray's untruthful COMPLETE feedback, (c) random search +
    ASHA (Ray Tune's default searcher), (d) Optuna alone (TPE + SuccessiveHalvingPruner, the same
    training code, no Ray); mean +- std over seeds and a paired t-test by seed of (a) against each.
rungs  configurations trained to the end with ASHA off: Spearman rank correlation between the
    validation accuracy at each round (a possible rung) and at the end.
"""
from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from ..core.config import TrainConfig
from ..core.trial import Status
from .parts import Bench, ran, search, space_at


def cpu_budget(b: Bench, budget: int = 900) -> dict[str, Any]:
    t0 = time.time()
    best = search(b, "simple_cnn", "cpu_budget", time_budget=budget)
    return {"command": f"search simple_cnn --time-budget {budget}", "wall_s": round(time.time() - t0, 1),
            "budget_s": budget, "trials": best["trials"], "configurations": ran(b.work / "cpu_budget"),
            "status_counts": best["status_counts"], "test_acc": best["test_acc"],
            "val_acc": best["val_acc"], "phases": best["phases"], "best_config": best["best_config"]}


QUALITY_VARIANTS = {"a_tpe_truthful": {"searcher": "tpe"},
                    "b_tpe_complete": {"searcher": "tpe", "study_feedback": "complete"},
                    "c_random_asha": {"searcher": "random"}}


def optuna_alone(space: str, data_dir: str | None, subset: int, seed: int, budget_s: float) -> dict[str, Any]:
    """Variant (d): Optuna's own loop (ask/tell), TPE + SuccessiveHalvingPruner at the space's rungs,
    the same fit() and data, no Ray; stops proposing when the clock says so and tests its best trial."""
    import optuna

    from ..data.cache import device_data
    from ..data.sources import resolve_data_dir
    from ..tuning.plan import time_reserve
    from ..training.evaluate import evaluate_test
    from ..training.fit import fit
    from ..core.spaces import asha_rounds, load_space
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t0 = time.time()
    spec = load_space(space)
    base = spec.base.replace(data_dir=resolve_data_dir(data_dir, False), subset=subset, seed=seed,
                             threads=os.cpu_count())
    max_t, grace = asha_rounds(spec.budget, base.evals_per_epoch)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=optuna.pruners.SuccessiveHalvingPruner(
                                    min_resource=grace, reduction_factor=int(spec.budget.reduction_factor)))
    study.enqueue_trial(spec.default_point())
    data = device_data(base)
    deadline = t0 + budget_s - time_reserve(budget_s)
    best: tuple[float, Any, TrainConfig] | None = None
    trials = 0
    while time.time() < deadline:
        trial = study.ask(spec.optuna_space())
        cfg = base.replace(**trial.params)

        def on_round(record, _state, trial=trial):
            trial.report(record["val_acc"], record["round"])
            return trial.should_prune() or time.time() > deadline
        result = fit(cfg, data, on_round=on_round)
        trials += 1
        last = result.last.get("val_acc", float("nan"))
        ended = (Status.COMPLETED, Status.EARLY_STOPPED, Status.DIVERGED)
        if result.status in ended and len(result.history) >= max_t:
            study.tell(trial, last)
        elif result.status == Status.DIVERGED:
            study.tell(trial, 0.0)
        else:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        if last == last and (best is None or last > best[0]):
            best = (last, result.model, cfg)
    test_acc = evaluate_test(best[1], best[2], data)["test_acc"]
    return {"trials": trials, "configurations": trials,      # each asked trial trains at least one round
            "best_val_acc": best[0], "test_acc": test_acc, "wall_s": round(time.time() - t0, 1)}


def search_quality(b: Bench, quick: bool) -> dict[str, Any]:
    """Each variant searches simple_cnn for the same wall-clock budget on the same stratified subset,
    once per seed; (a) is compared with each other variant by a paired t-test over the seeds."""
    from scipy import stats
    subset, budget, seeds = (3000, 60, [0, 1]) if quick else (5000, 150, [0, 1, 2])
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in [*QUALITY_VARIANTS, "d_optuna_alone"]}
    for seed in seeds:
        for variant, flags in QUALITY_VARIANTS.items():
            t0 = time.time()
            s = search(b, "simple_cnn", f"q_{variant}_{seed}", subset=subset, time_budget=budget, seed=seed, **flags)
            runs[variant].append({"seed": seed, "trials": s["trials"],
                                  "configurations": ran(b.work / f"q_{variant}_{seed}"), "best_val_acc": s["val_acc"],
                                  "test_acc": s["test_acc"], "wall_s": round(time.time() - t0, 1)})
        runs["d_optuna_alone"].append({"seed": seed, **optuna_alone("simple_cnn", b.data_dir, subset, seed, budget)})
        print(f"search_quality seed {seed}: " + ", ".join(f"{v} {r[-1]['test_acc']:.4f}" for v, r in runs.items()),
              flush=True)
    table = {}
    for variant, rs in runs.items():
        row = {}
        for key in ("configurations", "best_val_acc", "test_acc"):
            values = [r[key] for r in rs]
            row[key] = {"mean": float(np.mean(values)),
                        "std": float(np.std(values, ddof=1)) if len(values) > 1 else None}
        if variant != "a_tpe_truthful":
            for key in ("best_val_acc", "test_acc"):
                a = [r[key] for r in runs["a_tpe_truthful"]]
                b = [r[key] for r in rs]
                row[f"p_{key}_vs_a"] = float(stats.ttest_rel(a, b).pvalue) if len(a) > 1 else None
        table[variant] = row
    return {"subset": subset, "budget_s": budget, "seeds": seeds, "runs": runs, "table": table}


def rungs(b: Bench, quick: bool) -> dict[str, Any]:
    """Where can ASHA judge? Every configuration runs to the end (grace period = max epochs: ASHA never
    stops one); per round, Spearman's rank correlation of validation accuracy with the final one.
    The rounds are quarter epochs whatever the space evaluates at: every place a rung could go."""
    import pandas as pd
    from scipy import stats

    from ..core.spaces import load_space
    subset, n = (3000, 6) if quick else (10000, 16)
    max_epochs = load_space("simple_cnn").budget.max_epochs
    s = search(b, space_at("simple_cnn", None, b.work, evals_per_epoch=4), "rungs", subset=subset, num_samples=n,
               grace_period=max_epochs, seed=0)
    history = pd.read_csv(b.work / "rungs" / "history.csv", dtype={"trial_id": str})
    acc = history.pivot(index="trial_id", columns="round", values="val_acc")
    final = acc[acc.columns.max()]
    rows = []
    for r in acc.columns:
        rho = stats.spearmanr(acc[r], final, nan_policy="omit").statistic
        rows.append({"round": int(r), "epoch": float(history.loc[history["round"] == r, "epoch"].iloc[0]),
                     "spearman_vs_final": round(float(rho), 3),
                     "median_val_acc": round(float(acc[r].median()), 4)})
        print(f"rungs: round {int(r):2d} epoch {rows[-1]['epoch']:.2f}: Spearman {rho:+.3f}, "
              f"median val_acc {rows[-1]['median_val_acc']:.3f}", flush=True)
    return {"subset": subset, "configurations": n, "trials": s["trials"], "max_epochs": max_epochs,
            "evals_per_epoch": 4, "per_round": rows}
