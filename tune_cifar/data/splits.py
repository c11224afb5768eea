"""Splits of the training images, scikit-learn's splitters underneath: a stratified subset, the
holdout (train, validation) split, repeated stratified K-fold, and checks that a split can be made."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..core.config import UserError


def check_split(labels: np.ndarray, fraction: float, classes: tuple[str, ...], what: str) -> None:
    """A stratified split of `fraction` of `labels` is possible: 2+ images a class, 1+ a class each side."""
    counts = np.bincount(labels, minlength=len(classes))
    rarest = int(counts.argmin())
    if counts[rarest] < 2:
        raise UserError(f"class '{classes[rarest]}' has {counts[rarest]} training image(s): a stratified "
                        f"{what} split needs at least 2 of each class")
    n, c = len(labels), len(classes)
    held = math.ceil(fraction * n)
    if held < c or n - held < c:
        raise UserError(f"a {what} share of {fraction:g} of {n} training images leaves {held} / {n - held} "
                        f"images for {c} classes: a stratified split needs at least one of each class on "
                        "each side (use more images or another share)")



def check_subset(subset: int | None, labels: np.ndarray, what: str = "--subset") -> None:
    n_classes = len(np.unique(labels))
    if subset is None:
        return
    if subset < n_classes * 2:
        raise UserError(f"{what}={subset} is too small: a stratified subset needs at least two images "
                        f"of each of the {n_classes} classes ({n_classes * 2})")
    if subset > len(labels):
        raise UserError(f"{what}={subset} is larger than the {len(labels)} training images")


def stratified_subset(labels: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """Indices of a stratified, seeded subset of size n (all indices when n is None or everything)."""
    from sklearn.model_selection import train_test_split

    everything = np.arange(len(labels))
    if n is None or n >= len(labels):
        return everything
    check_subset(n, labels)
    idx, _ = train_test_split(everything, train_size=n, stratify=labels, random_state=seed)
    return np.sort(idx)


def train_val_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded split of positions 0..len(labels)-1 into (train, validation)."""
    from sklearn.model_selection import train_test_split

    everything = np.arange(len(labels))
    tr, va = train_test_split(everything, test_size=val_fraction, stratify=labels, random_state=seed)
    return np.sort(tr), np.sort(va)


def kfold_splits(labels: np.ndarray, k: int, seed: int, repeats: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """The K x R (train, validation) splits of repeated stratified K-fold, seeded: every configuration
    of an experiment sees the same splits, so their scores can be compared pairwise."""
    from sklearn.model_selection import RepeatedStratifiedKFold

    folds = RepeatedStratifiedKFold(n_splits=k, n_repeats=repeats, random_state=seed)
    return list(folds.split(np.zeros(len(labels)), labels))




# --------------------------------------------------------------------------- splitters
# One protocol, in the manner of scikit-learn's splitters: `split(labels) -> (train, validation)`
# positions into the pool's labels. Frozen dataclasses, so a splitter is also the per-process cache
# key of the data moved to the device.

@dataclass(frozen=True)
class Holdout:
    """A stratified, seeded `val_fraction` of the pool held out for validation (a search trial)."""
    val_fraction: float = 0.1
    seed: int = 0

    def split(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return train_val_split(labels, self.val_fraction, self.seed)


@dataclass(frozen=True)
class Fold:
    """Split `index` of the J = k x repeats splits of seeded, repeated stratified K-fold: every
    configuration of a cross-validation sees the same J splits."""
    index: int
    k: int
    repeats: int = 1
    seed: int = 0

    def split(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return kfold_splits(labels, self.k, self.seed, self.repeats)[self.index]


@dataclass(frozen=True)
class WholePool:
    """Every image of the pool trains and nothing is held out (the retrain of a cross-validated winner)."""

    def split(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.arange(len(labels)), np.arange(0)


Splitter = Holdout | Fold | WholePool
