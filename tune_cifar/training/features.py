"""Frozen mode's shortcut: the fixed backbone's features, computed once per process and reused.

In frozen mode nothing before the head changes between epochs or between trials, so the backbone's
output is a pure function of (data set, model, resolution, weights). It is computed once — for every
training image both as-is and horizontally flipped, for validation as-is — and each trial then trains
only its head on these features. (The test set is not needed by trials: the best model is evaluated
on test images once, at the end.)

Augmentation in frozen mode: each epoch every training image is seen either plain or flipped, at
random (the flip of `crop_flip` / `flip`). Random crops are not applied: they would need a backbone
pass per epoch, which is exactly the cost this cache removes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn

from ..data.store import DeviceData, DeviceSplit, batch_order

_CACHE: dict[tuple[Any, ...], tuple[DeviceData, "FrozenFeatures"]] = {}  # data kept alive: its id is in the key


@dataclass
class FeatureSplit:
    views: torch.Tensor          # (n_views, N, D): view 0 plain, view 1 flipped (train only)
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, batch_size: int, augment: str = "none", generator: torch.Generator | None = None,
                order: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx_all, stop = batch_order(len(self.y), batch_size, order, self.y.device)
        for start in range(0, stop, batch_size):
            idx = idx_all[start:start + batch_size]
            if augment != "none" and self.views.shape[0] > 1:
                view = (torch.rand(len(idx), generator=generator) < 0.5).long().to(idx.device)
                x = self.views[view, idx]
            else:
                x = self.views[0, idx]
            yield x.float(), self.y[idx]


@dataclass
class FrozenFeatures:
    train: FeatureSplit
    val: FeatureSplit


@torch.no_grad()
def _extract(backbone: nn.Module, split: DeviceSplit, rt, flips: bool) -> FeatureSplit:
    store = torch.bfloat16 if rt.autocast_dtype is not None else torch.float32
    if len(split) == 0:             # no validation split (a retrain on the whole pool): nothing to extract
        return FeatureSplit(torch.zeros((1, 0, 0), dtype=store, device=split.y.device), split.y)
    views = []
    for flip in ([False, True] if flips else [False]):
        parts = []
        for x, _ in split.batches(256 if rt.resolution <= 64 else 64, rt.resolution,
                                  channels_last=rt.channels_last):
            with rt.autocast():
                parts.append(backbone(x.flip(3) if flip else x).to(store))
        views.append(torch.cat(parts))
    return FeatureSplit(torch.stack(views), split.y)


def frozen_features(backbone: nn.Module, data: DeviceData, rt, key: tuple[Any, ...]) -> FrozenFeatures:
    """Features of `data` through `backbone` (eval mode, placed by the caller: step.place), cached for
    the life of this process."""
    full_key = (id(data), rt.resolution, rt.device, rt.autocast_dtype) + tuple(key)
    if full_key not in _CACHE:
        backbone.eval()
        _CACHE.clear()        # one feature set per process: a new data set or model replaces it
        _CACHE[full_key] = data, FrozenFeatures(_extract(backbone, data.train, rt, flips=True),
                                                _extract(backbone, data.val, rt, flips=False))
    return _CACHE[full_key][1]
