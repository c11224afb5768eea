"""On the device: the uint8 store moved once, cropped, flipped, resized and normalised there in
whole batches.

There is no DataLoader and no PIL in the training hot path. The uint8 store is moved to the device
once (150 MB for CIFAR). A store that does not fit the device (`streams`: more than half of the free
CUDA memory after a 1 GiB reserve) stays in host memory and each batch is gathered into a pinned
buffer and copied asynchronously; on the CPU the device is host memory, so nothing is streamed there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..core.config import UserError

if TYPE_CHECKING:                      # a type only: the store does not depend on how images were read
    from .readers import ImageSet

MEAN = (0.4914, 0.4822, 0.4465)    # CIFAR-10's channel statistics, used to normalise every data set
STD = (0.2470, 0.2435, 0.2616)
STREAM_RESERVE = 1 << 30            # CUDA memory kept free for the model, activations and other trials
STREAM_SHARE = 0.5                  # at most this share of the rest may hold the resident data


def device_of(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} asked for, but no CUDA GPU is visible")
    return torch.device(name)


def streams(nbytes: int, device_type: str, free_bytes: int | None = None) -> bool:
    """Keep a uint8 store of `nbytes` in host memory and stream it per batch? Only on CUDA, and only
    when it exceeds STREAM_SHARE of the free memory left after STREAM_RESERVE (the model, its
    activations and the other trials sharing the GPU need the rest). On the CPU the device is host
    memory: streaming would only add a copy."""
    if device_type != "cuda" or free_bytes is None:
        return False
    return nbytes > STREAM_SHARE * (free_bytes - STREAM_RESERVE)


class DeviceSplit:
    """One split (train / val / test) as uint8 with batched augmentation: resident on the device, or
    (streamed) rows `rows` of a host array, each batch gathered into a pinned buffer and copied."""

    def __init__(self, x: np.ndarray, y: np.ndarray, device: torch.device, rows: np.ndarray | None = None,
                 stream: bool = False):
        self.device = device
        self.stream = stream
        if stream:
            self.x = torch.from_numpy(x)                 # the whole host array, shared by the splits
            self.rows = torch.from_numpy(np.arange(len(x)) if rows is None else np.asarray(rows, dtype=np.int64))
            self._staging: list[tuple[torch.Tensor, torch.cuda.Event | None] | None] = [None, None]
            self._slot = 0
        else:
            self.x = torch.from_numpy(np.ascontiguousarray(x if rows is None else x[rows])).to(device)
        self.y = torch.from_numpy(np.ascontiguousarray(y if rows is None else y[rows])).to(device)

    def __len__(self) -> int:
        return len(self.y)

    def _gather(self, idx: torch.Tensor) -> torch.Tensor:
        """uint8 images `idx` of this split on the device."""
        if not self.stream:
            return self.x[idx]
        rows = self.rows[idx.cpu()]
        cuda = self.device.type == "cuda"
        self._slot ^= 1
        slot = self._staging[self._slot]
        if slot is None or len(slot[0]) < len(rows):
            buf = torch.empty((len(rows), *self.x.shape[1:]), dtype=torch.uint8, pin_memory=cuda)
        else:
            buf, done = slot
            if done is not None:
                done.synchronize()                       # its previous copy has left the buffer
        out = buf[:len(rows)]
        torch.index_select(self.x, 0, rows, out=out)
        x = out.to(self.device, non_blocking=cuda)
        done = None
        if cuda:
            done = torch.cuda.Event()
            done.record()
        self._staging[self._slot] = (buf, done)
        return x

    def batches(self, batch_size: int, resolution: int, augment: str = "none",
                generator: torch.Generator | None = None, order: torch.Tensor | None = None,
                channels_last: bool = False, dtype: torch.dtype = torch.float32
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches in `order` (training: only full batches) or, without it, all images in order."""
        idx_all, stop = batch_order(len(self.y), batch_size, order, torch.device("cpu") if self.stream else self.device)
        for start in range(0, stop, batch_size):
            idx = idx_all[start:start + batch_size]
            x = self._gather(idx)
            if augment != "none":
                x = augment_batch(x, augment, generator)
            yield to_model_input(x, resolution, channels_last, dtype), self.y[idx.to(self.device)]


def batch_order(n: int, batch_size: int, order: torch.Tensor | None, device) -> tuple[torch.Tensor, int]:
    if order is None:
        return torch.arange(n, device=device), n
    m = len(order)
    return order.to(device), (m - m % batch_size if m >= batch_size else m)


def augment_batch(x: torch.Tensor, augment: str, generator: torch.Generator | None) -> torch.Tensor:
    """Random crop (reflect padding of 1/8 of the side: 4 px at 32 px) and horizontal flip of a uint8
    batch, on its device."""
    b = x.shape[0]
    dev = x.device
    if augment == "crop_flip":
        # A shifted window whose out-of-range rows/columns are mirrored: the same pixels as
        # reflect-padding and cropping, gathered in one indexing op without a padded copy.
        h, w = x.shape[2], x.shape[3]
        pad = max(1, round(min(h, w) / 8))
        dy = torch.randint(-pad, pad + 1, (b,), generator=generator).to(dev)
        dx = torch.randint(-pad, pad + 1, (b,), generator=generator).to(dev)
        rows = _reflect(dy[:, None] + torch.arange(h, device=dev), h)[:, None, :, None]
        cols = _reflect(dx[:, None] + torch.arange(w, device=dev), w)[:, None, None, :]
        x = x[torch.arange(b, device=dev)[:, None, None, None],
              torch.arange(x.shape[1], device=dev)[None, :, None, None], rows, cols]
    flip = (torch.rand(b, generator=generator) < 0.5).to(dev)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    i = i.abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


_NORM: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def to_model_input(x: torch.Tensor, resolution: int, channels_last: bool = False,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B,3,S,S) -> normalised float at the model's resolution (bilinear resize on device)."""
    key = (x.device, dtype)
    if key not in _NORM:
        _NORM[key] = (torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1) * 255,
                      torch.tensor(STD, device=x.device).view(1, 3, 1, 1) * 255)
    mean, std = _NORM[key]
    out = (x.float() - mean) / std
    if out.shape[-1] != resolution or out.shape[-2] != resolution:
        out = F.interpolate(out, size=(resolution, resolution), mode="bilinear", align_corners=False,
                            antialias=False)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out.to(dtype)


@dataclass
class DeviceData:
    """train / val / test splits of one data set on one device, plus where they came from."""
    train: DeviceSplit
    val: DeviceSplit
    test: DeviceSplit
    classes: tuple[str, ...]
    source: str
    test_source: str = "test set"
    streamed: bool = False           # kept in host memory and copied per batch (did not fit the device)


_ANNOUNCED: set[str] = set()


def _free_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def to_device(cifar: "ImageSet", train_idx: np.ndarray, val_idx: np.ndarray, device: torch.device,
              stream: bool | None = None) -> DeviceData:
    """The three splits on `device`: resident, or streamed from host memory when they do not fit
    (`streams`; stream=True/False forces the choice)."""
    per_image = int(np.prod(cifar.train_x.shape[1:]))
    nbytes = (len(train_idx) + len(val_idx) + len(cifar.test_y)) * per_image
    if stream is None:
        free = _free_bytes(device)
        stream = streams(nbytes, device.type, free)
        if stream and "stream" not in _ANNOUNCED:
            _ANNOUNCED.add("stream")
            print(f"data: {nbytes / 2**30:.1f} GiB of uint8 images do not fit in {device} memory "
                  f"({free / 2**30:.1f} GiB free): kept in host memory and streamed per batch (pinned)", flush=True)
    return DeviceData(DeviceSplit(cifar.train_x, cifar.train_y, device, train_idx, stream),
                      DeviceSplit(cifar.train_x, cifar.train_y, device, val_idx, stream),
                      DeviceSplit(cifar.test_x, cifar.test_y, device, None, stream),
                      cifar.classes, cifar.source, cifar.test_source, stream)


