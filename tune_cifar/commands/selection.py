"""`search NAME --cv-top N [--k K] [--repeats R]`: from a search to one honest test number.

The best of many noisy validation scores is biased upwards (the winner's curse), so with --cv-top
the search only shortlists:
  1. search    the usual search (search.py); its summary goes to search.json, the test set untouched;
  2. cv/       the N best successful configurations cross-validated (kfold.py's machinery and
               statistics) over the images the search trained and validated on;
  3. final     --final retrain: the configuration with the highest CV mean trained once on all of
               those images for the full epoch budget (no Ray: one run, checkpointed every round to
               retrain.pt); --final bagging: its J split models of stage 2, softmax averaged, no
               training (final_stage.py); either with --tta flip;
  4. test      that model evaluated on the test set, once per experiment: best.json, best_model.pt.
Each stage leaves its files behind, so `--resume` continues at the first unfinished one.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from ..core.config import TrainConfig, UserError, value_from_csv
from ..tuning.plan import Phases, Plan, RunOptions
from ..tuning.runner import print_phases, run
from ..results.folders import ranked_trials, read_json, write_json, write_torch
from ..results.tested import test_once
from .search import SEARCH_STAGE_FILE
from .kfold import race_summary
from ..core.finals import final_line
from .final_stage import LEGACY_FINAL, LEGACY_TTA, split_members
from ..core.spaces import SearchSpec

CV_DIR = "cv"
RETRAIN_CHECKPOINT = "retrain.pt"
TESTED_FILE = "test.json"          # the one test's metrics, written the moment it is done
LEGACY_SUMMARY = {"kind": LEGACY_FINAL, "tta": LEGACY_TTA}     # a test.json from before `final` existed


def run_selection(plan: Plan, report: Callable[[Path], Any] | None = None) -> dict[str, Any]:
    opts, exp = plan.opts, plan.exp
    if (exp / "best.json").exists():       # every stage done: the test set is not looked at again
        print(f"{exp}: already finished (best.json)")
        return read_json(exp / "best.json")
    phases = Phases(opts.started)
    spec = plan.trials.spec
    if (exp / SEARCH_STAGE_FILE).exists():
        print(f"search stage already done ({exp / SEARCH_STAGE_FILE})")
    else:
        run(plan)
    phases.done("search")

    shortlist = shortlisted(exp, opts.cv_top)
    candidates = [{k: value_from_csv(k, v) for k, v in row.items()}
                  for row in shortlist[list(spec.space)].to_dict("records")]
    table = cross_validate_shortlist(plan, spec, candidates)
    phases.done("cv")

    if not table["mean_acc"].notna().any():
        raise UserError(f"{exp / CV_DIR}: no configuration finished a fold (see cv/kfold_folds.csv)")
    winner = int(table.iloc[0]["config"])
    # no validation images in the retrain, so nothing for early stopping to watch
    cfg = spec.base.replace(**candidates[winner], patience=0)
    if (exp / TESTED_FILE).exists():        # tested already, then interrupted: never test twice
        tested = read_json(exp / TESTED_FILE)
    else:
        tested = final_model_tested(plan, cfg, winner, phases)
        write_json(exp / TESTED_FILE, tested)
        phases.done("test")

    search = read_json(exp / SEARCH_STAGE_FILE)
    row = shortlist.iloc[winner]
    best = table.iloc[0]
    # the retrained model's precision, never the search trial's (a test.json from before it was recorded)
    summary = {**search, **tested, "precision_used": tested.get("precision_used"), "selected_by": "cv",
               "best_trial": row["trial_id"],
               "best_config": candidates[winner],
               "val_acc": float(row["last_val_acc"]), "epochs": float(cfg.epochs),
               "cv": {"k": opts.k, "repeats": opts.repeats, "top": len(shortlist), "winner": winner,
                      "mean_acc": float(best["mean_acc"]), "ci_low": float(best["ci_low"]),
                      "ci_high": float(best["ci_high"]), "table": f"{CV_DIR}/kfold.csv",
                      **race_summary(read_json(exp / CV_DIR / "kfold_summary.json")),
                      "shortlist": shortlist_record(shortlist, table, list(spec.space))},
               "phases": phases.seconds}
    write_json(exp / "best.json", summary)
    if report is not None:
        report(exp)
        phases.done("report")
    summary.update(phases=phases.seconds, wall_s=round(phases.elapsed(), 1))
    write_json(exp / "best.json", summary)
    print(f"\ncross-validated winner: configuration {winner} (search trial {row['trial_id']}): CV accuracy "
          f"{best['mean_acc']:.4f} [{best['ci_low']:.4f}, {best['ci_high']:.4f}], search validation "
          f"{row['last_val_acc']:.4f}; final model: {final_line(summary.get('final') or LEGACY_SUMMARY)}, "
          f"test_acc={tested['test_acc']:.4f}")
    print_phases(phases)
    return summary


def final_model_tested(plan: Plan, cfg: TrainConfig, winner: int, phases: Phases) -> dict[str, Any]:
    """Stages 3 and 4: the final model the plan declares (--final, --tta), tested once."""
    from ..results.folders import RAY_DIR
    from ..tuning.tuners import tune_path
    opts, exp = plan.opts, plan.exp
    final, tta = opts.final or LEGACY_FINAL, opts.tta or LEGACY_TTA
    if final == "bagging":
        splits = opts.k * opts.repeats
        root = Path(tune_path(exp / CV_DIR, opts.ray)) / RAY_DIR
        print(f"\nbagging the {splits} split models of configuration {winner} the cross-validation trained"
              + (" (flip TTA)" if tta == "flip" else ""), flush=True)
        tested = test_once(exp, cfg, kind="bagging", tta=tta,
                           members=lambda n: split_members(root, cfg, winner, splits, n))
        return {**tested, "precision_used": tested["final"]["members"][0].get("precision_used")}
    print(f"\nretraining configuration {winner} on all the images the search trained and validated on, "
          f"for {cfg.epochs} epochs", flush=True)
    retrained = retrain(cfg, exp)
    phases.done("retrain")
    return {**test_once(exp, cfg, model=retrained.model, kind="retrain", tta=tta),
            "precision_used": retrained.last.get("precision_used")}


def shortlisted(exp: Path, top: int) -> pd.DataFrame:
    """The `top` best successful trials of the search stage (fewer if fewer succeeded, and said)."""
    ranked = ranked_trials(pd.read_csv(exp / "trials.csv", dtype={"trial_id": str}))
    shortlist = ranked.head(top).reset_index(drop=True)
    if len(shortlist) < top:
        print(f"note: --cv-top {top}: only {len(shortlist)} trial(s) finished successfully; "
              f"cross-validating {len(shortlist)}", flush=True)
    return shortlist


def cross_validate_shortlist(plan: Plan, spec: SearchSpec, candidates: list[dict[str, Any]]) -> pd.DataFrame:
    """Stage 2: kfold's cross_validate over the shortlist in cv/, with the search's run options (its
    --time-budget bounds the search stage only) and the search's fitting to the data; returns kfold.csv."""
    from .kfold import KFoldOptions, cross_validate
    shared = {f.name: getattr(plan.opts, f.name) for f in dataclasses.fields(RunOptions)}
    o = plan.opts
    cv_opts = KFoldOptions(**{**shared, "time_budget": None, "started": time.time()}, k=o.k, repeats=o.repeats,
                           race=o.race, race_min_splits=o.race_min_splits, race_alpha=o.race_alpha)
    return cross_validate(spec, spec.base.replace(patience=0), candidates, plan.exp / CV_DIR, cv_opts,
                          plan.resources, plan.inject, plan.fitting)


def retrain(cfg: TrainConfig, exp: Path):
    """Stage 3: the winner trained on every image of the pool; a checkpoint per round for --resume.
    Returns fit's FitResult (the model, and the rounds with the precision they ran in)."""
    import torch

    from ..data.cache import device_data
    from ..data.splits import WholePool
    from ..training.fit import fit
    checkpoint = exp / RETRAIN_CHECKPOINT
    resume = torch.load(checkpoint, map_location="cpu", weights_only=True) if checkpoint.exists() else None
    data = device_data(cfg, WholePool())

    def on_round(record: dict[str, Any], state) -> None:
        write_torch(checkpoint, state())
        print(f"retrain epoch {record['epoch']:g}: train_loss={record['train_loss']:.4f} "
              f"train_acc={record['train_acc']:.4f}", flush=True)
    return fit(cfg, data, on_round=on_round, resume=resume)


def shortlist_record(shortlist: pd.DataFrame, table: pd.DataFrame, searched: list[str]) -> list[dict[str, Any]]:
    """Per shortlisted trial: its single search validation score beside its CV mean (the gap between
    the two is the winner's curse the CV stage corrects)."""
    cv = table.set_index("config")
    return [{"config": i, "trial_id": row["trial_id"], **{k: value_from_csv(k, row[k]) for k in searched},
             "search_val_acc": float(row["last_val_acc"]), "cv_mean_acc": float(cv.loc[i, "mean_acc"]),
             "cv_ci_low": float(cv.loc[i, "ci_low"]), "cv_ci_high": float(cv.loc[i, "ci_high"]),
             "tied_with_best": None if pd.isna(cv.loc[i, "tied_with_best"]) else bool(cv.loc[i, "tied_with_best"])}
            for i, row in shortlist.iterrows()]
