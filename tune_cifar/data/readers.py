"""Readers: CIFAR-10 / CIFAR-100 pickles and image-folder trees in, an `ImageSet` of uint8 arrays out.

- `cifar-10-batches-py/` pickles and `cifar-100-python/` pickles (train, test, meta; the 100 fine
  labels), read directly, so copies whose MD5s differ from the official tarballs load;
- an image-folder tree `train/<class>/*` with an optional `test/<class>/*`: any N >= 2 classes,
  images of any size, mode (L, P, RGBA, RGB, CMYK, ...) and format PIL reads (.png .jpg .jpeg .bmp
  .webp .tif .ppm .pgm; searched recursively inside a class folder). Without test/, a stratified
  20 % of train/ (seeded by split_seed) is held out as the test set, and `test_source` says so;
- synthetic data of CIFAR's shape (benchmarks).

Stored resolution of image folders. Each image is decoded once, at load time, with PIL: EXIF-rotated,
converted to RGB (alpha dropped, as torchvision's ImageFolder does), centre-cropped to a square and
resized to S x S, where S is the smallest of
  (a) the model's input resolution (`core.config.resolve_resolution`): more pixels would be thrown
      away by the resize to the model on the device;
  (b) the 90th percentile of the images' short sides: beyond the images' own size S would only store
      upsampled copies (a few larger outliers do not set it);
  (c) the side at which the whole set fits MAX_STORED_BYTES (4 GiB) as uint8, but never below 32 px.
The trade-off: the model's resolution keeps every pixel it can use, but the store costs 3 S^2 bytes
an image in every process that trains (50,000 images at 224 px are 7.5 GB in host memory, again on the
device, and again in each Ray worker); CIFAR's 32 px would make a 224 px fine-tune see blurred,
upsampled images. (c) bounds the cost and only bites for large sets: 10,000 images keep 224 px,
50,000 are stored at 169 px and upsampled on the device. CIFAR pickles stay 32 px. S depends on the
config only through (a), so the per-process cache key holds the model's resolution for image folders
(and split_seed when the test set is held out of train/).
"""
from __future__ import annotations

import math
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.config import UserError

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
BATCH_FILES = [f"data_batch_{i}" for i in range(1, 6)]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
HELD_OUT_TEST = 0.2                 # share of train/ held out as the test set when there is no test/
MAX_STORED_BYTES = 4 << 30          # image folders: the uint8 store is shrunk to fit this (never below 32 px)
MIN_STORED = 32


@dataclass
class ImageSet:
    """The whole data set as numpy arrays: images (N, 3, S, S) uint8 (S = 32 for CIFAR), labels (N,) int64."""
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: tuple[str, ...]
    source: str                      # the folder read (what a config's data_dir pins)
    test_source: str = "test set"    # where the test images came from (a folder, or the held-out share)

    @property
    def resolution(self) -> int:
        return int(self.train_x.shape[-1])


def _decode_keys(d: dict) -> dict:
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _read_pickle_batch(path: Path, label_key: str = "labels", num_classes: int = 10,
                       what: str = "CIFAR-10 batch") -> tuple[np.ndarray, np.ndarray]:
    if not path.exists():
        raise UserError(f"{path}: missing {what} file")
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as e:
        raise UserError(f"{path}: not a readable {what} ({type(e).__name__}: {e})") from None
    if not isinstance(batch, dict):
        raise UserError(f"{path}: not a {what} (expected a dict, got {type(batch).__name__})")
    batch = _decode_keys(batch)
    if "data" not in batch or label_key not in batch:
        raise UserError(f"{path}: not a {what} (no 'data' / '{label_key}' keys)")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise UserError(f"{path}: images are {data.dtype} {data.shape}, expected uint8 (N, 3072) = 32x32 RGB")
    if len(labels) != len(data):
        raise UserError(f"{path}: {len(data)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() > num_classes - 1):
        raise UserError(f"{path}: labels outside 0..{num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels


def _read_names(meta: Path, key: str, n: int) -> tuple[str, ...] | None:
    """Class names from a meta pickle (None when the key is missing); a wrong count is an error."""
    try:
        with open(meta, "rb") as f:
            content = _decode_keys(pickle.load(f, encoding="bytes"))
    except Exception as e:
        raise UserError(f"{meta}: unreadable ({type(e).__name__}: {e})") from None
    names = content.get(key)
    if names is None:
        return None
    names = tuple(x.decode() if isinstance(x, bytes) else str(x) for x in names)
    if len(names) != n:
        raise UserError(f"{meta}: {len(names)} {key}, expected {n}")
    return names


def read_batches(folder: Path) -> ImageSet:
    """The official CIFAR-10 python layout: five training pickles + test_batch (+ batches.meta)."""
    parts = [_read_pickle_batch(folder / name) for name in BATCH_FILES]
    test_x, test_y = _read_pickle_batch(folder / "test_batch")
    meta = folder / "batches.meta"
    classes = (_read_names(meta, "label_names", 10) if meta.exists() else None) or CLASSES
    return ImageSet(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                 test_x, test_y, classes, source=str(folder), test_source=str(folder / "test_batch"))


def read_cifar100(folder: Path) -> ImageSet:
    """The official CIFAR-100 python layout: `train`, `test` and `meta` pickles; the 100 fine labels."""
    meta = folder / "meta"
    if not meta.is_file():
        raise UserError(f"{meta}: missing CIFAR-100 meta file (it holds the class names)")
    classes = _read_names(meta, "fine_label_names", 100)
    if classes is None:
        raise UserError(f"{meta}: no 'fine_label_names'")
    read = dict(label_key="fine_labels", num_classes=100, what="CIFAR-100 pickle")
    train_x, train_y = _read_pickle_batch(folder / "train", **read)
    test_x, test_y = _read_pickle_batch(folder / "test", **read)
    return ImageSet(train_x, train_y, test_x, test_y, classes, source=str(folder), test_source=str(folder / "test"))


def list_split(split_dir: Path) -> tuple[list[str], list[Path], np.ndarray]:
    """(class names, image files, labels) of `split/<class>/**/<image>`: classes in alphabetical order
    (hidden folders and non-image files are ignored); a split without classes or a class without
    images is an error naming the folder."""
    if not split_dir.is_dir():
        raise UserError(f"{split_dir}: not a folder")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"{split_dir}: no class folders (expected {split_dir}/<class>/<image>.png|.jpg)")
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = sorted(p for p in (split_dir / name).rglob("*")
                       if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())
        if not found:
            raise UserError(f"{split_dir / name}: empty class folder (no {'/'.join(IMAGE_SUFFIXES)} images)")
        files += found
        labels += [label] * len(found)
    return classes, files, np.asarray(labels, dtype=np.int64)


def _unreadable(path: Path, e: Exception) -> UserError:
    first = (str(e).splitlines() or [""])[0][:160]
    return UserError(f"{path}: unreadable image ({type(e).__name__}: {first})")


def _short_side(path: Path) -> int:
    from PIL import Image
    try:
        with Image.open(path) as im:
            return min(im.size)
    except Exception as e:
        raise _unreadable(path, e) from None


def _load_image(path: Path, size: int) -> np.ndarray:
    """One file -> (3, size, size) uint8 RGB: EXIF-rotated, alpha dropped, centre-cropped, resized."""
    from PIL import Image, ImageOps
    try:
        with Image.open(path) as im:
            im.draft("RGB", (size, size))            # JPEG: decode at 1/2..1/8 scale when still >= size
            im = ImageOps.exif_transpose(im)
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")              # PIL's advice for palette images with transparency
            im = ImageOps.fit(im.convert("RGB"), (size, size), method=Image.Resampling.BICUBIC)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    except Exception as e:
        raise _unreadable(path, e) from None


def _threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))       # PIL decodes without the GIL


def choose_stored_size(short_sides: np.ndarray, n_images: int, model_resolution: int | None) -> int:
    """S for an image folder: the smallest of the model's resolution, the 90th percentile of the
    images' short sides and the side that fits MAX_STORED_BYTES (not below MIN_STORED)."""
    native = int(np.percentile(short_sides, 90, method="higher"))
    budget = max(MIN_STORED, int(math.sqrt(MAX_STORED_BYTES / (3 * max(1, n_images)))))
    return max(1, min(native, budget, model_resolution or native))


def decode_images(files: list[Path], size: int) -> np.ndarray:
    out = np.empty((len(files), 3, size, size), dtype=np.uint8)

    def one(i: int) -> None:
        out[i] = _load_image(files[i], size)
    with ThreadPoolExecutor(_threads()) as pool:
        list(pool.map(one, range(len(files))))
    return out


def held_out_test(labels: np.ndarray, classes: list[str], train_dir: Path, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) positions: a stratified, seeded HELD_OUT_TEST share of train/ as the test set."""
    from sklearn.model_selection import train_test_split
    counts = np.bincount(labels, minlength=len(classes))
    need = math.ceil(1 / HELD_OUT_TEST)
    if counts.min() < need:
        name = classes[int(counts.argmin())]
        raise UserError(f"{train_dir / name}: {counts.min()} image(s); without a test/ folder "
                        f"{HELD_OUT_TEST:.0%} of each class is held out as the test set, which needs at least "
                        f"{need} images per class (or add {train_dir.parent / 'test'}/<class>/)")
    everything = np.arange(len(labels))
    tr, te = train_test_split(everything, test_size=HELD_OUT_TEST, stratify=labels, random_state=seed)
    return np.sort(tr), np.sort(te)


def read_image_folders(root: Path, size: int | None = None, split_seed: int = 0) -> ImageSet:
    """`train/<class>/*` and, when present, `test/<class>/*` with the same class folders; without
    test/, a stratified HELD_OUT_TEST share of train/ (seed split_seed) is the test set.
    size: the model's input resolution (None: the images' own size), see the module docstring."""
    train_dir, test_dir = root / "train", root / "test"
    classes, files, labels = list_split(train_dir)
    if len(classes) < 2:
        raise UserError(f"{train_dir}: one class folder ({classes[0]}); a classifier needs at least 2 classes")
    if test_dir.exists():
        test_classes, test_files, test_labels = list_split(test_dir)
        if test_classes != classes:
            only_train = sorted(set(classes) - set(test_classes))
            only_test = sorted(set(test_classes) - set(classes))
            raise UserError(f"{root}: class folders differ between train/ and test/ (only in train/: "
                            f"{', '.join(only_train) or '-'}; only in test/: {', '.join(only_test) or '-'})")
        test_source = str(test_dir)
    else:
        tr, te = held_out_test(labels, classes, train_dir, split_seed)
        test_files, test_labels = [files[i] for i in te], labels[te]
        files, labels = [files[i] for i in tr], labels[tr]
        test_source = (f"held out {HELD_OUT_TEST:.0%} of {train_dir} (stratified, seed {split_seed}; "
                       "there is no test/ folder)")
    everything = files + test_files
    with ThreadPoolExecutor(_threads()) as pool:
        sides = np.fromiter(pool.map(_short_side, everything), dtype=np.int64, count=len(everything))
    s = choose_stored_size(sides, len(everything), size)
    return ImageSet(decode_images(files, s), labels, decode_images(test_files, s), test_labels, tuple(classes),
                 source=str(root), test_source=test_source)


def synthetic_images(n_train: int = 50_000, n_test: int = 10_000, seed: int = 0) -> ImageSet:
    """Random images of the real shape, for benchmarks where only the speed matters."""
    rng = np.random.default_rng(seed)
    return ImageSet(rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8),
                 np.arange(n_train, dtype=np.int64) % 10,
                 rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8),
                 np.arange(n_test, dtype=np.int64) % 10, CLASSES, source="synthetic", test_source="synthetic")

