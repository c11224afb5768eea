"""The final model of `search --cv-top`, and the flags that choose it.

`--final retrain`: the cross-validated winner trained once more on the whole pool (selection.retrain).
`--final bagging`: no training at all: the winner's J split models, which the cross-validation
trained (each on its part of the pool) and Tune left in its trial folders under cv/, averaged
(training/final.py). A fold trial's folder holds Tune's params.json (its candidate and split, in the
trial protocol's keys, core/trial.py) and its last checkpoint (`num_to_keep=1`), whose state file is
what fit() saved after its last round (tuning/trainable.py); a split model is a member when it ran
every round of its budget.

Reads folders only: no Ray (bagging also works on --resume, after the Ray of the CV stage is gone).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..core.config import TrainConfig, UserError
from ..core.trial import fold_of
from ..core.finals import DEFAULT_FINAL, DEFAULT_TTA, check_final
from ..training.final import Member

STATE_FILE = "state.pt"       # tuning/trainable.STATE_FILE (not imported: that module imports Ray)
# what a plan.json from before --final / --tta existed was run with
LEGACY_FINAL, LEGACY_TTA = "retrain", "none"


def resolved(final: str | None, tta: str | None, cv_top: int | None, legacy: bool = False) -> tuple[str | None, str]:
    """(final, tta) a plan records: the flags as given, else the defaults (bench --only final_model);
    `legacy`: an experiment planned before these flags, run with the behaviour of its time. No
    --cv-top: no final kind to choose (the best trial is the final model)."""
    check_final(final, tta, cv_top)
    if cv_top is None:
        return None, tta or (LEGACY_TTA if legacy else DEFAULT_TTA)
    return final or (LEGACY_FINAL if legacy else DEFAULT_FINAL), tta or (LEGACY_TTA if legacy else DEFAULT_TTA)


def check_bagging_storage(final: str | None, tune_root: str) -> None:
    """Bagging reads the split models from the CV stage's Tune folders: they must be on this machine."""
    if final == "bagging" and "://" in tune_root:
        raise UserError(f"--final bagging reads the split models of the cross-validation from its trial folders, "
                        f"which --storage {tune_root} keeps remotely: use a shared folder as --storage, or "
                        "--final retrain")


def fold_trials(tune_root: Path, candidate: int) -> dict[int, Path]:
    """{split: trial folder} of one candidate's fold trials anywhere under `tune_root`."""
    found: dict[int, Path] = {}
    for params in sorted(Path(tune_root).rglob("params.json")):
        ref = fold_of(json.loads(params.read_text()))
        if ref is not None and ref.candidate == candidate:
            found[ref.split] = params.parent
    return found


def last_checkpoint(trial_dir: Path) -> Path | None:
    """The newest checkpoint_NNNNNN folder of a trial that holds a state file."""
    ckpts = [c for c in trial_dir.glob("checkpoint_*") if (c / STATE_FILE).is_file()]
    return max(ckpts, key=lambda c: int(c.name.rsplit("_", 1)[1])) if ckpts else None


def split_members(tune_root: Path, cfg: TrainConfig, candidate: int, splits: int,
                  num_classes: int) -> list[Member]:
    """The winner's split models, one per split that ran every round, in split order."""
    import torch

    from ..training.evaluate import model_from_state
    rounds = cfg.epochs * cfg.evals_per_epoch
    trials = fold_trials(tune_root, candidate)
    members, missing = [], []
    for split in range(splits):
        ckpt = last_checkpoint(trials[split]) if split in trials else None
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True) if ckpt else None
        history = state["history"] if state else []
        if len(history) < rounds or not math.isfinite(history[-1]["train_loss"]):
            missing.append(split)
            continue
        members.append(Member(cfg, model_from_state(cfg, state, num_classes).eval(),
                              {"split": split, "trial": trials[split].name, "val_acc": float(history[-1]["val_acc"]),
                               "rounds": len(history), "precision_used": history[-1].get("precision_used")}))
    if not members:
        raise UserError(f"{tune_root}: no split model of configuration {candidate} ran all its {rounds} rounds "
                        "(see kfold_folds.csv): use --final retrain")
    if missing:
        print(f"note: --final bagging: split(s) {', '.join(map(str, missing))} of configuration {candidate} did not "
              f"finish; bagging the other {len(members)}", flush=True)
    return members

