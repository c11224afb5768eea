"""Once per process: the data set a TrainConfig names, read from disk once, and its split moved to
the device once (Ray reuses its worker processes between trials, so every trial after the first in a
worker finds its data here)."""
from __future__ import annotations

import math
import os

import numpy as np
import torch

from ..core.config import UserError, resolve_resolution
from .readers import ImageSet
from .sources import load_images, locate
from .splits import Holdout, Splitter, check_split, check_subset, stratified_subset
from .store import DeviceData, device_of, to_device


def train_size(cfg, k: int | None = None) -> int:
    """How many images a config trains on per epoch: the (subset of the) training set less its
    validation share, or less one fold of k (the smallest a fold's training part can be)."""
    n = len(training_labels(cfg))
    n = min(cfg.subset, n) if cfg.subset else n
    return n - math.ceil(n / k if k else cfg.val_fraction * n)


def check_data(cfg) -> None:
    """The training images a config asks for exist (reads every file), its --subset fits them, and
    the stratified validation split can be made."""
    images = _loaded(cfg)[1]
    check_subset(cfg.subset, images.train_y)
    pool = images.train_y[stratified_subset(images.train_y, cfg.subset, cfg.split_seed)]
    check_split(pool, cfg.val_fraction, images.classes, "validation")


def check_folds(k: int, repeats: int, base, flag: str = "--k") -> None:
    """K must fit the rarest class of the pool the folds are cut from (stratification)."""
    if k < 2:
        raise UserError(f"{flag}={k}: K-fold needs at least 2 folds")
    if repeats < 1:
        raise UserError(f"--repeats={repeats} must be at least 1")
    labels = training_labels(base)
    pool = labels[stratified_subset(labels, base.subset, base.split_seed)] if base.subset else labels
    smallest = int(np.bincount(pool).min())
    if k > smallest:
        raise UserError(f"{flag}={k} is larger than the {smallest} images of the rarest class: "
                        "use fewer folds or a larger --subset")


def stored_resolution(cfg) -> int | None:
    """The model's input resolution: the bound on the stored size of image folders (None for CIFAR)."""
    layout = locate(cfg.data_dir)
    return resolve_resolution(cfg.model, cfg.mode, cfg.resolution) if layout and layout[0] == "folders" else None


def prepare(images: ImageSet, subset: int | None, val_fraction: float, split_seed: int,
            device: torch.device, split: Splitter | None = None, stream: bool | None = None) -> DeviceData:
    """Stratified subset (the pool) -> `split` of it (default: the Holdout of val_fraction) -> device.
    The test set is left whole."""
    pool = stratified_subset(images.train_y, subset, split_seed)
    tr, va = (split or Holdout(val_fraction, split_seed)).split(images.train_y[pool])
    return to_device(images, pool[tr], pool[va], device, stream)


# --------------------------------------------------------------------------- once per process

_LOADED: dict[tuple, ImageSet] = {}
_PREPARED: dict[tuple, DeviceData] = {}


def _loaded(cfg, synthetic: bool = False) -> tuple[tuple, ImageSet]:
    """The data set a TrainConfig names, read from disk once per process (and its cache key: where
    it is read from, plus for image folders what decides the stored arrays: the model's resolution
    and, when the test set is held out of train/, split_seed)."""
    if synthetic:
        source: tuple = ("synthetic",)
    else:
        layout = locate(cfg.data_dir)
        folders = layout is not None and layout[0] == "folders"
        held_out = folders and not (layout[1] / "test").exists()
        source = (cfg.data_dir, os.environ.get("TUNE_CIFAR_DATA"), cfg.download,
                  stored_resolution(cfg) if folders else None, cfg.split_seed if held_out else None)
    if source not in _LOADED:
        _LOADED.clear()
        _LOADED[source] = load_images(cfg.data_dir, cfg.download, synthetic, size=source[3] if not synthetic else None,
                                       split_seed=cfg.split_seed)
    return source, _LOADED[source]


def images_of(cfg) -> ImageSet:
    """The whole data set a TrainConfig names (read once per process)."""
    return _loaded(cfg)[1]


def training_labels(cfg) -> np.ndarray:
    """Labels of all training images (subset and split not applied): reads and checks every file."""
    return _loaded(cfg)[1].train_y


def device_data(cfg, split: Splitter | None = None, synthetic: bool = False) -> DeviceData:
    """The DeviceData a TrainConfig asks for, read from disk and moved to the device once per process.

    Ray reuses its worker processes between trials, so every trial after the first in a worker
    finds its data here already on the device. split: the Holdout of cfg by default.
    """
    source, images = _loaded(cfg, synthetic)
    device = device_of(cfg.device)
    split = split or Holdout(cfg.val_fraction, cfg.split_seed)
    key = source + (cfg.subset, cfg.split_seed, str(device), split)
    if key not in _PREPARED:
        _PREPARED.clear()      # one prepared split per process: trials of one experiment share it
        _PREPARED[key] = prepare(images, cfg.subset, cfg.val_fraction, cfg.split_seed, device, split)
    return _PREPARED[key]
