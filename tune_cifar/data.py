"""CIFAR-10 in, uint8 tensors on the training device out, augmented there in whole batches.

Readers: the `cifar-10-batches-py` pickles (read directly, so copies whose MD5s differ from the
official tarball load), torchvision's download (when allowed), an ImageFolder tree
`train/<class>/*.png|jpg` + `test/<class>/*`, and synthetic data of the same shape.
There is no DataLoader and no PIL in the training hot path: the whole set is moved to the device
once as uint8 (150 MB for 50,000 images) and cropped, flipped, resized and normalised there.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .config import UserError

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tune_cifar" / "data"
BATCH_FILES = [f"data_batch_{i}" for i in range(1, 6)]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


@dataclass
class Cifar:
    """The whole data set as numpy arrays: images (N, 3, 32, 32) uint8, labels (N,) int64."""
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: tuple[str, ...]
    source: str


# --------------------------------------------------------------------------- finding the data

def candidate_dirs(data_dir: str | os.PathLike | None) -> list[tuple[str, Path]]:
    """Where to look, in order: --data-dir, then $TUNE_CIFAR_DATA, then the default cache folder."""
    if data_dir is not None:
        return [("--data-dir", Path(data_dir).expanduser())]
    found = []
    if os.environ.get("TUNE_CIFAR_DATA"):
        found.append(("TUNE_CIFAR_DATA", Path(os.environ["TUNE_CIFAR_DATA"]).expanduser()))
    found.append(("default cache", DEFAULT_CACHE))
    return found


def detect_layout(root: Path) -> tuple[str, Path] | None:
    """('batches', dir) or ('folders', dir) when root holds a CIFAR-10 layout, else None."""
    for d in (root / "cifar-10-batches-py", root):
        if (d / "data_batch_1").exists() or (d / "test_batch").exists():
            return "batches", d
    if (root / "train").is_dir() and (root / "test").is_dir():
        return "folders", root
    return None


def load_cifar10(data_dir: str | os.PathLike | None = None, download: bool = False,
                 synthetic: bool = False) -> Cifar:
    if synthetic:
        return synthetic_cifar()
    places = candidate_dirs(data_dir)
    for _, root in places:
        layout = detect_layout(root)
        if layout is None:
            continue
        kind, where = layout
        return read_batches(where) if kind == "batches" else read_image_folders(where)
    if download:
        root = places[0][1]
        return torchvision_download(root)
    looked = "; ".join(f"{label} {path}" for label, path in places)
    if data_dir is not None and not Path(data_dir).exists():
        raise UserError(f"data folder {data_dir} does not exist (pass --data-dir DIR holding "
                        "cifar-10-batches-py/ or train/<class>/ + test/<class>/, or --download)")
    raise UserError(f"no CIFAR-10 found (looked in: {looked}); pass --data-dir DIR holding "
                    "cifar-10-batches-py/ or train/<class>/ + test/<class>/, set TUNE_CIFAR_DATA, "
                    "or add --download when online")


def torchvision_download(root: Path) -> Cifar:
    """torchvision fetches and checks the official tarball; we then read its pickles ourselves."""
    import torchvision
    try:
        torchvision.datasets.CIFAR10(root=str(root), train=True, download=True)
    except Exception as e:  # offline: URLError, socket errors, ...
        raise UserError(f"downloading CIFAR-10 into {root} failed ({type(e).__name__}: {e}); "
                        "pass --data-dir to a local copy") from None
    return read_batches(root / "cifar-10-batches-py")


# --------------------------------------------------------------------------- readers

def _read_pickle_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.exists():
        raise UserError(f"{path}: missing CIFAR-10 batch file")
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as e:
        raise UserError(f"{path}: not a readable CIFAR-10 batch ({type(e).__name__}: {e})") from None
    if not isinstance(batch, dict):
        raise UserError(f"{path}: not a CIFAR-10 batch (expected a dict, got {type(batch).__name__})")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise UserError(f"{path}: not a CIFAR-10 batch (no 'data' / 'labels' keys)")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise UserError(f"{path}: images are {data.dtype} {data.shape}, expected uint8 (N, 3072) = 32x32 RGB")
    if len(labels) != len(data):
        raise UserError(f"{path}: {len(data)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise UserError(f"{path}: labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def read_batches(folder: Path) -> Cifar:
    """The official python layout: five training pickles + test_batch (+ batches.meta)."""
    parts = [_read_pickle_batch(folder / name) for name in BATCH_FILES]
    test_x, test_y = _read_pickle_batch(folder / "test_batch")
    classes = CLASSES
    meta = folder / "batches.meta"
    if meta.exists():
        try:
            with open(meta, "rb") as f:
                names = pickle.load(f, encoding="latin1").get("label_names")
            if names and len(names) == 10:
                classes = tuple(names)
        except Exception as e:
            raise UserError(f"{meta}: unreadable ({type(e).__name__}: {e})") from None
    return Cifar(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                 test_x, test_y, classes, source=str(folder))


def _read_split_folder(split_dir: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    from PIL import Image, UnidentifiedImageError  # loading only; never in the training loop

    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"{split_dir}: no class folders (expected {split_dir}/<class>/*.png)")
    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (split_dir / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"{split_dir / name}: no images (.png/.jpg)")
        for path in files:
            try:
                with Image.open(path) as im:
                    if im.size != (32, 32):
                        raise UserError(f"{path}: image is {im.size[0]}x{im.size[1]}, expected 32x32")
                    images.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
            except (UnidentifiedImageError, OSError) as e:
                raise UserError(f"{path}: unreadable image ({e})") from None
            labels.append(label)
    x = np.stack(images).transpose(0, 3, 1, 2).copy()
    return classes, x, np.asarray(labels, dtype=np.int64)


def read_image_folders(root: Path) -> Cifar:
    """`train/<class>/*` and `test/<class>/*`: the class folders must be the same in both."""
    train_classes, train_x, train_y = _read_split_folder(root / "train")
    test_classes, test_x, test_y = _read_split_folder(root / "test")
    if train_classes != test_classes:
        raise UserError(f"{root}: class folders differ between train/ ({', '.join(train_classes)}) "
                        f"and test/ ({', '.join(test_classes)})")
    if len(train_classes) != 10:
        raise UserError(f"{root / 'train'}: {len(train_classes)} class folders, CIFAR-10 needs 10")
    return Cifar(train_x, train_y, test_x, test_y, tuple(train_classes), source=str(root))


def synthetic_cifar(n_train: int = 50_000, n_test: int = 10_000, seed: int = 0) -> Cifar:
    """Random images of the real shape, for benchmarks where only the speed matters."""
    rng = np.random.default_rng(seed)
    return Cifar(rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8),
                 np.arange(n_train, dtype=np.int64) % 10,
                 rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8),
                 np.arange(n_test, dtype=np.int64) % 10, CLASSES, source="synthetic")


# --------------------------------------------------------------------------- splits (scikit-learn)

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


def kfold_splits(labels: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import StratifiedKFold

    folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return list(folds.split(np.zeros(len(labels)), labels))


# --------------------------------------------------------------------------- on the device

def device_of(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} asked for, but no CUDA GPU is visible")
    return torch.device(name)


class DeviceSplit:
    """One split (train / val / test) resident on the device as uint8, with batched augmentation."""

    def __init__(self, x: np.ndarray, y: np.ndarray, device: torch.device):
        self.x = torch.from_numpy(np.ascontiguousarray(x)).to(device)
        self.y = torch.from_numpy(np.ascontiguousarray(y)).to(device)
        self.device = device

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, batch_size: int, resolution: int, augment: str = "none",
                generator: torch.Generator | None = None, order: torch.Tensor | None = None,
                channels_last: bool = False, dtype: torch.dtype = torch.float32
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches in `order` (training: only full batches) or, without it, all images in order."""
        idx_all, stop = batch_order(len(self.y), batch_size, order, self.device)
        for start in range(0, stop, batch_size):
            idx = idx_all[start:start + batch_size]
            x = self.x[idx]
            if augment != "none":
                x = augment_batch(x, augment, generator)
            yield to_model_input(x, resolution, channels_last, dtype), self.y[idx]


def batch_order(n: int, batch_size: int, order: torch.Tensor | None, device) -> tuple[torch.Tensor, int]:
    if order is None:
        return torch.arange(n, device=device), n
    m = len(order)
    return order.to(device), (m - m % batch_size if m >= batch_size else m)


def augment_batch(x: torch.Tensor, augment: str, generator: torch.Generator | None) -> torch.Tensor:
    """Random crop (4 px reflect padding) and horizontal flip of a uint8 batch, on its device."""
    b = x.shape[0]
    dev = x.device
    if augment == "crop_flip":
        # A shifted window whose out-of-range rows/columns are mirrored: the same pixels as
        # reflect-padding by 4 and cropping, gathered in one indexing op without a padded copy.
        pad, h, w = 4, x.shape[2], x.shape[3]
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
    """uint8 (B,3,32,32) -> normalised float at the model's resolution (bilinear resize on device)."""
    key = (x.device, dtype)
    if key not in _NORM:
        _NORM[key] = (torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1) * 255,
                      torch.tensor(STD, device=x.device).view(1, 3, 1, 1) * 255)
    mean, std = _NORM[key]
    out = (x.float() - mean) / std
    if out.shape[-1] != resolution:
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


def to_device(cifar: Cifar, train_idx: np.ndarray, val_idx: np.ndarray, device: torch.device) -> DeviceData:
    return DeviceData(DeviceSplit(cifar.train_x[train_idx], cifar.train_y[train_idx], device),
                      DeviceSplit(cifar.train_x[val_idx], cifar.train_y[val_idx], device),
                      DeviceSplit(cifar.test_x, cifar.test_y, device), cifar.classes, cifar.source)


def prepare(cifar: Cifar, subset: int | None, val_fraction: float, split_seed: int,
            device: torch.device, fold: tuple[int, int] | None = None) -> DeviceData:
    """Subset -> (train, val) split (or fold `i` of `k`) -> device. The test set is left whole."""
    pool = stratified_subset(cifar.train_y, subset, split_seed)
    if fold is None:
        tr, va = train_val_split(cifar.train_y[pool], val_fraction, split_seed)
    else:
        i, k = fold
        tr, va = kfold_splits(cifar.train_y[pool], k, split_seed)[i]
    return to_device(cifar, pool[tr], pool[va], device)


# --------------------------------------------------------------------------- once per process

_LOADED: dict[tuple, Cifar] = {}
_PREPARED: dict[tuple, DeviceData] = {}


def _loaded(cfg, synthetic: bool = False) -> tuple[tuple, Cifar]:
    """The data set a TrainConfig names, read from disk once per process (and its cache key)."""
    source = ("synthetic",) if synthetic else (cfg.data_dir, os.environ.get("TUNE_CIFAR_DATA"), cfg.download)
    if source not in _LOADED:
        _LOADED.clear()
        _LOADED[source] = load_cifar10(cfg.data_dir, cfg.download, synthetic)
    return source, _LOADED[source]


def training_labels(cfg) -> np.ndarray:
    """Labels of all training images (subset and split not applied): reads and checks every file."""
    return _loaded(cfg)[1].train_y


def load_for(cfg, fold: tuple[int, int] | None = None, synthetic: bool = False) -> DeviceData:
    """The DeviceData a TrainConfig asks for, read from disk and moved to the device once per process.

    Ray reuses its worker processes between trials, so every trial after the first in a worker
    finds its data here already on the device.
    """
    source, cifar = _loaded(cfg, synthetic)
    device = device_of(cfg.device)
    key = source + (cfg.subset, cfg.val_fraction, cfg.split_seed, str(device), fold)
    if key not in _PREPARED:
        _PREPARED.clear()      # one prepared split per process: trials of one experiment share it
        _PREPARED[key] = prepare(cifar, cfg.subset, cfg.val_fraction, cfg.split_seed, device, fold)
    return _PREPARED[key]
