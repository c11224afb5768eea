"""A plan fitted to the data: what `search` and `kfold` change on a small data set, and why.

The shipped spaces and presets are sized for CIFAR-10's 45,000 training images. On a set of a few
hundred images they ask for what cannot run (a batch larger than the training split) or for what
cannot learn (5 epochs of 3 optimizer steps). Before anything is written or started, the plan is
fitted to the smallest training split a trial of it sees (`n_train`: a search's hold-out training
part; kfold's and --cv-top's smallest fold training part):

1. `--quick`'s subset, when the data has fewer training images, becomes all of them (fit_subset);
2. batch-size choices larger than `n_train` are dropped from the space; when none is left, the
   space's smallest choice is halved until an epoch holds FALLBACK_BATCHES full batches (not below
   MIN_BATCH; below that, nothing can run: a UserError) (fit_batch_sizes);
3. `evals_per_epoch` is lowered to the full batches an epoch of the largest batch size left holds,
   so every round of every trial trains on at least one batch (fit_evals);
4. when the trials train on the whole data set (no --subset of the user's) and the budget was not
   given as a flag, max_epochs is raised so that a full-budget trial at the smallest batch size
   makes MIN_STEPS optimizer steps, with one evaluation an epoch, and ASHA's grace period keeps its
   share of the budget (fit_budget).

Every change prints one line and is recorded under "fitting" in plan.json, next to the fitted spec
that --resume reads back (so a resumed run uses exactly what was planned). What the user gave
explicitly (kfold's `--set batch_size=` / `--set evals_per_epoch=`, `--max-epochs`, `--epochs`,
`--grace-period`, `--subset`) is never changed: when it cannot run, the existing checks say so in
one line (exit 2). A CIFAR-size run is untouched: rules 1-3 change only what could not run, and
rule 4 only a budget of fewer than MIN_STEPS steps (CIFAR's 5 epochs of 45,000 images at batch 128
are 1,755 steps; --quick's 10,000-image subset is a subset, left as it is).

Nothing here reads data or imports torch: the callers pass the sizes (data.train_size).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .config import UserError
from .spaces import Dist, SearchSpec

# Optimizer steps a full-budget trial makes at least (at the space's smallest batch size). Measured
# (BENCHMARKS.md, "Small data sets"): simple_cnn's default point (batch 128) on 1,800 CIFAR training
# images reaches 0.441 test accuracy after 70 steps (the shipped 5 epochs), 0.619 after 308 and
# 0.641 after 602; on 450 images 0.270 after 51 steps and 0.461 after 300. 300 takes most of the gain
# at half the cost of 600, and is about a sixth of what a CIFAR trial makes (1,755 steps).
MIN_STEPS = 300
FALLBACK_BATCHES = 4     # full batches an epoch holds at a halved batch size (a shuffled epoch, not one step)
MIN_BATCH = 8            # the smallest batch a halved choice may reach (BatchNorm's batch statistics)


@dataclass
class Fitting:
    """What fitting changed: one note per change (printed) and the record plan.json keeps."""
    n_train: int
    notes: list[str] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)

    def note(self, key: str, before: Any, after: Any, line: str) -> None:
        self.record[key] = {"from": before, "to": after}
        self.notes.append(line if line.startswith("note: ") else f"note: {line}")

    def to_dict(self) -> dict[str, Any] | None:
        """plan.json's "fitting": None when nothing changed (a CIFAR-size plan stays as it was)."""
        if not self.record:
            return None
        return {"n_train": self.n_train, "min_steps": MIN_STEPS, "changed": self.record, "notes": self.notes}


def fit_subset(preset: int | None, n_images: int, preset_name: str = "--quick") -> tuple[int | None, str | None]:
    """A preset's subset (not the user's --subset) capped at the data: (subset, note or None)."""
    if preset is None or preset < n_images:
        return preset, None
    return None, (f"note: {preset_name} trains on a subset of {preset:,} images; the data has "
                  f"{n_images:,} training images: using all of them")


def fit_batch_sizes(choices: tuple[int, ...], n_train: int, where: str) -> tuple[tuple[int, ...], str | None]:
    """The batch-size choices a split of n_train images can run (at least one full batch), and a note
    when any was dropped. None left: the smallest choice halved (see the module docstring)."""
    kept = tuple(b for b in choices if b <= n_train)
    if len(kept) == len(choices):
        return kept, None
    dropped = ", ".join(str(b) for b in choices if b > n_train)
    if kept:
        return kept, (f"note: {where}: dropped batch size(s) {dropped}, larger than the {n_train} images "
                      f"a trial trains on (left: {', '.join(map(str, kept))})")
    b = min(choices)
    while b > MIN_BATCH and n_train // b < FALLBACK_BATCHES:
        b = max(MIN_BATCH, b // 2)
    if b > n_train:
        raise UserError(f"{where}: every batch size ({', '.join(map(str, choices))}) is larger than the "
                        f"{n_train} images a trial trains on, and so is the smallest fallback ({MIN_BATCH}): "
                        "use more images (or fewer folds)")
    return (b,), (f"note: {where}: every batch size ({', '.join(map(str, choices))}) is larger than the "
                  f"{n_train} images a trial trains on: using {b} ({n_train // b} full batches an epoch)")


def fit_evals(evals: int, n_train: int, largest_batch: int) -> int:
    """evals_per_epoch lowered to the full batches of `largest_batch` an epoch holds: each round
    trains on whole batches (fit.py), so every trial can run; on a small set an epoch is a few steps
    and a second evaluation within it says little that the next epoch will not."""
    return max(1, min(evals, n_train // largest_batch))


def fit_budget(max_epochs: int, grace_period: float, evals: int, steps_per_epoch: int) -> tuple[int, float]:
    """(max_epochs, grace_period) giving a full-budget trial MIN_STEPS optimizer steps at
    `steps_per_epoch`; the grace period keeps its share of the budget, rounded to whole evaluation
    rounds (at least one). Unchanged when the budget already makes MIN_STEPS steps."""
    if max_epochs * steps_per_epoch >= MIN_STEPS:
        return max_epochs, grace_period
    epochs = math.ceil(MIN_STEPS / max(1, steps_per_epoch))
    return epochs, whole_rounds(grace_period * epochs / max_epochs, evals, epochs)


def whole_rounds(epochs: float, evals: int, most: int) -> float:
    """`epochs` rounded to a whole number of evaluation rounds, at least one, at most `most` epochs."""
    return min(float(most), max(1, round(epochs * evals)) / evals)


def fit_plan(spec: SearchSpec, base, n_train: int, *, given: set[str], scale_budget: bool,
             batch_size: int | None = None, where: str = "space") -> tuple[SearchSpec, Any, Fitting]:
    """The spec and base config of a search or kfold fitted to `n_train` (rules 2-4 of the module
    docstring), each change printed as one line. `base.epochs` is the budget (a search's max_epochs,
    kfold's epochs per fold). `given`: the keys the user gave explicitly ("batch_size",
    "evals_per_epoch", "max_epochs", "grace_period"), never changed; `batch_size`: the one the user
    gave (kfold's --set), if any. Returns (spec, base, what was changed): spec.space, spec.default,
    spec.budget, spec.base and base carry the fit; both are returned as they came when nothing changed."""
    fitting = Fitting(n_train)
    space, default = dict(spec.space), dict(spec.default)
    dist = space.get("batch_size")
    if dist is not None and dist.kind == "choice" and "batch_size" not in given:
        kept, note = fit_batch_sizes(tuple(dist.values), n_train, f"{where}.batch_size")
        if note:
            space["batch_size"] = Dist("choice", kept)
            fitting.note("space.batch_size", list(dist.values), list(kept), note)
            if "batch_size" in default and default["batch_size"] not in kept:
                fitted = max([b for b in kept if b <= default["batch_size"]] or [min(kept)])
                fitting.record["default.batch_size"] = {"from": default["batch_size"], "to": fitted}
                default["batch_size"] = fitted
    if batch_size is not None:
        batches = [batch_size]
    elif "batch_size" in space and space["batch_size"].kind == "choice":
        batches = list(space["batch_size"].values)
    else:
        batches = [base.batch_size]
    evals, grace, epochs = base.evals_per_epoch, spec.budget.grace_period, base.epochs
    steps = n_train // min(batches)      # 0: a batch the user gave that cannot run (checked by the caller)
    if scale_budget and "max_epochs" not in given and steps:
        epochs, grace = fit_budget(base.epochs, grace, evals, steps)
        if epochs != base.epochs:
            # Many short epochs: one evaluation round each. The rungs now fall on whole epochs, and
            # every round costs a validation pass, a report to Ray and a checkpoint.
            if "evals_per_epoch" not in given:
                evals = 1
            grace = spec.budget.grace_period if "grace_period" in given else whole_rounds(grace, evals, epochs)
            fitting.note("max_epochs", base.epochs, epochs,
                         f"budget: {base.epochs} epochs of {n_train} images are {base.epochs * steps} optimizer "
                         f"steps at batch size {min(batches)}; using {epochs} epochs ({epochs * steps} steps, at "
                         f"least {MIN_STEPS}), {evals} evaluation(s) an epoch, ASHA's grace period "
                         f"{spec.budget.grace_period:g} -> {grace:g} epochs")
    if "evals_per_epoch" not in given:
        fitted = fit_evals(evals, n_train, max(batches))
        if fitted != evals:
            fitting.note("evals_per_epoch", base.evals_per_epoch, fitted,
                         f"evals_per_epoch={base.evals_per_epoch} -> {fitted}: an epoch of {n_train} images "
                         f"holds {n_train // max(batches)} full batch(es) of {max(batches)}")
            evals = fitted
            if "grace_period" not in given:
                grace = whole_rounds(grace, evals, epochs)
    if evals != base.evals_per_epoch:
        fitting.record["evals_per_epoch"] = {"from": base.evals_per_epoch, "to": evals}
    if grace != spec.budget.grace_period:
        fitting.record["grace_period"] = {"from": spec.budget.grace_period, "to": grace}
    if not fitting.record:
        return spec, base, fitting
    for line in fitting.notes:
        print(line, flush=True)
    budget = dataclasses.replace(spec.budget, grace_period=grace)
    fitted_base = {"evals_per_epoch": evals}
    if epochs != base.epochs:       # else kfold's --epochs stays in base only, the space's budget as it was
        budget, fitted_base["epochs"] = dataclasses.replace(budget, max_epochs=epochs), epochs
    spec = dataclasses.replace(spec, space=space, default=default, base=spec.base.replace(**fitted_base),
                               budget=budget)
    return spec, base.replace(**fitted_base), fitting
