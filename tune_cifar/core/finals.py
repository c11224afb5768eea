"""What the final model of an experiment may be (no torch: the CLI and the planners check flags
with it before anything is imported, written or started). The predictors are training/final.py.

--final (search --cv-top only): retrain | bagging;  --tta (search, train): none | flip.
The defaults are the winner of `bench --only final_model` (BENCHMARKS.md, README).
"""
from __future__ import annotations

from typing import Any

from .config import UserError

KINDS = ("best_trial", "train", "retrain", "bagging")
FINALS = ("retrain", "bagging")      # what --final chooses between (the final model of --cv-top)
TTAS = ("none", "flip")
DEFAULT_FINAL = "retrain"      # bench --only final_model: neither bagging nor flip won (BENCHMARKS.md)
DEFAULT_TTA = "none"


def check_final(final: str | None, tta: str | None, cv_top: int | None, cv_top_known: bool = True) -> None:
    """--final / --tta as given (None: the default): known values; --final only with --cv-top (when
    `cv_top_known`: on --resume it is in plan.json, read later)."""
    if final is not None and final not in FINALS:
        raise UserError(f"--final {final} is not one of {', '.join(FINALS)}")
    check_tta(tta)
    if final is not None and cv_top is None and cv_top_known:
        raise UserError(f"--final {final} chooses the final model of --cv-top (the winner retrained, or its split "
                        "models bagged): add --cv-top N")


def check_tta(tta: str | None) -> None:
    if tta is not None and tta not in TTAS:
        raise UserError(f"--tta {tta} is not one of {', '.join(TTAS)}")


def final_line(summary: dict[str, Any] | None) -> str:
    """How the final model is said in one line (the command's closing lines, the report)."""
    summary = summary or {"kind": "best_trial", "tta": "none"}      # a best.json from before `final`
    kind, tta, n = summary["kind"], summary.get("tta", "none"), summary.get("n_members", 1)
    what = {"bagging": f"the winner's {n} split models of the cross-validation, softmax averaged",
            "retrain": "the winner retrained on the whole pool", "best_trial": "the best trial's model",
            "train": "the trained model"}[kind]
    return what + (" with flip test-time augmentation (mean of the image and its mirror)" if tta == "flip" else "")


def final_label(summary: dict[str, Any]) -> str:
    """A table cell: `bagging x5 + flip`, `retrain`, `best_trial + flip`."""
    n = summary.get("n_members", 1)
    return summary["kind"] + (f" x{n}" if n > 1 else "") + (" + flip" if summary.get("tta") == "flip" else "")


def final_of(best: dict[str, Any]) -> dict[str, Any]:
    """best.json's final model; one from before `final` was recorded: the retrained winner of --cv-top,
    else the best trial, without TTA."""
    return best.get("final") or {"kind": "retrain" if best.get("selected_by") == "cv" else "best_trial",
                                 "tta": "none", "n_members": 1}
