"""Data sets in, uint8 tensors on the training device out, augmented there in whole batches.

Readers (`detect_layout`), tried in each folder of `candidate_dirs`:
- `cifar-10-batches-py/` pickles and `cifar-100-python/` pickles (train, test, meta; the 100 fine
  labels), read directly, so copies whose MD5s differ from the official tarballs load;
- torchvision's download of either when nothing is on disk and downloads are allowed
  (`--dataset cifar100` asks for CIFAR-100; without it CIFAR-10 is downloaded);
- an image-folder tree `train/<class>/*` with an optional `test/<class>/*`: any N >= 2 classes,
  images of any size, mode (L, P, RGBA, RGB, CMYK, ...) and format PIL reads (.png .jpg .jpeg .bmp
  .webp .tif .ppm .pgm; searched recursively inside a class folder). Without test/, a stratified
  20 % of train/ (seeded by split_seed) is held out as the test set, and `test_source` says so;
- synthetic data of CIFAR's shape (benchmarks).

Stored resolution of image folders. Each image is decoded once, at load time, with PIL: EXIF-rotated,
converted to RGB (alpha dropped, as torchvision's ImageFolder does), centre-cropped to a square and
resized to S x S, where S is the smallest of
  (a) the model's input resolution (`models.resolve_resolution`): more pixels would be thrown away
      by the resize to the model on the device;
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

Everything after loading is the same for every data set: there is no DataLoader and no PIL in the
training hot path. The uint8 store is moved to the device once (150 MB for CIFAR) and cropped,
flipped, resized and normalised there in whole batches. A store that does not fit the device
(`streams`: more than half of the free CUDA memory after a 1 GiB reserve) stays in host memory and
each batch is gathered into a pinned buffer and copied asynchronously; on the CPU the device is host
memory, so nothing is streamed there.
"""
from __future__ import annotations

import math
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .config import UserError

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN = (0.4914, 0.4822, 0.4465)    # CIFAR-10's channel statistics, used to normalise every data set
STD = (0.2470, 0.2435, 0.2616)
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tune_cifar" / "data"
BATCH_FILES = [f"data_batch_{i}" for i in range(1, 6)]
DATASETS = ("cifar10", "cifar100")
PICKLE_DIRS = {"batches": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
HELD_OUT_TEST = 0.2                 # share of train/ held out as the test set when there is no test/
MAX_STORED_BYTES = 4 << 30          # image folders: the uint8 store is shrunk to fit this (never below 32 px)
MIN_STORED = 32
STREAM_RESERVE = 1 << 30            # CUDA memory kept free for the model, activations and other trials
STREAM_SHARE = 0.5                  # at most this share of the rest may hold the resident data


@dataclass
class Cifar:
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


def check_dataset(dataset: str | None) -> None:
    if dataset is not None and dataset not in DATASETS:
        raise UserError(f"--dataset {dataset} is not one of {', '.join(DATASETS)}")


def detect_layout(root: Path, dataset: str | None = None) -> tuple[str, Path] | None:
    """('batches' | 'cifar100' | 'folders', dir) when root holds a data set, else None.

    dataset None: any layout (CIFAR-10 pickles first, then CIFAR-100, then image folders);
    'cifar10' / 'cifar100': only that data set's pickles."""
    kinds = {None: ("batches", "cifar100", "folders"), "cifar10": ("batches",), "cifar100": ("cifar100",)}[dataset]
    root = Path(root)
    for kind in kinds:
        if kind == "folders":
            if (root / "train").is_dir():
                return "folders", root
            continue
        for d in (root / PICKLE_DIRS[kind], root):
            if kind == "batches" and ((d / "data_batch_1").exists() or (d / "test_batch").exists()):
                return kind, d
            if kind == "cifar100" and (d / "meta").is_file() and ((d / "train").is_file() or (d / "test").is_file()):
                return kind, d
    return None


def locate(data_dir: str | os.PathLike | None, dataset: str | None = None) -> tuple[str, Path] | None:
    """The first layout found in the candidate folders (no file is read)."""
    for _, root in candidate_dirs(data_dir):
        layout = detect_layout(root, dataset)
        if layout:
            return layout
    return None


def dataset_name(dataset: str | None) -> str:
    return {None: "CIFAR-10", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}[dataset]


def load_cifar10(data_dir: str | os.PathLike | None = None, download: bool = False,
                 synthetic: bool = False, *, dataset: str | None = None, size: int | None = None,
                 split_seed: int = 0) -> Cifar:
    """The data set in `data_dir` (else $TUNE_CIFAR_DATA, else the cache; downloaded there when allowed).

    dataset: restrict the search to 'cifar10' or 'cifar100' (and download that one when missing).
    size: the model's input resolution, an upper bound of the stored size of image folders.
    split_seed: seeds the test share held out of train/ when an image folder has no test/."""
    if synthetic:
        return synthetic_cifar()
    check_dataset(dataset)
    places = candidate_dirs(data_dir)
    for _, root in places:
        layout = detect_layout(root, dataset)
        if layout is not None:
            return read_layout(layout, size, split_seed)
    if download and data_dir is None:
        return torchvision_download(DEFAULT_CACHE, dataset or "cifar10")   # torchvision's convention
    looked = "; ".join(f"{label} {path}" for label, path in places)
    pickles = f"{PICKLE_DIRS['cifar100']}/" if dataset == "cifar100" else f"{PICKLE_DIRS['batches']}/"
    holding = pickles if dataset else f"{pickles}, cifar-100-python/ or train/<class>/ [+ test/<class>/]"
    if data_dir is not None and not Path(data_dir).exists():
        raise UserError(f"data folder {data_dir} does not exist (pass --data-dir DIR holding {holding}, "
                        "or leave it out to download)")
    raise UserError(f"no {dataset_name(dataset)} found (looked in: {looked}); pass --data-dir DIR holding "
                    f"{holding}, set TUNE_CIFAR_DATA, or leave out --offline to download it")


def read_layout(layout: tuple[str, Path], size: int | None = None, split_seed: int = 0) -> Cifar:
    kind, where = layout
    if kind == "batches":
        return read_batches(where)
    if kind == "cifar100":
        return read_cifar100(where)
    return read_image_folders(where, size, split_seed)


def torchvision_download(root: Path, dataset: str = "cifar10") -> Cifar:
    """torchvision fetches and checks the official tarball; we then read its pickles ourselves."""
    import torchvision
    name = dataset_name(dataset)
    try:
        getattr(torchvision.datasets, name.replace("-", ""))(root=str(root), train=True, download=True)
    except Exception as e:  # offline: URLError, socket errors, ...
        first = (str(e).splitlines() or [""])[0][:160]
        raise UserError(f"downloading {name} into {root} failed ({type(e).__name__}: {first}); "
                        "pass --data-dir to a local copy") from None
    if dataset == "cifar100":
        return read_cifar100(root / PICKLE_DIRS["cifar100"])
    return read_batches(root / PICKLE_DIRS["batches"])


def downloads_allowed(download: bool = False, offline: bool = False) -> bool:
    """By default what is missing (data, ImageNet weights) is downloaded, as torchvision does;
    --offline or TUNE_CIFAR_OFFLINE=1 forbids it, and --download allows it again over the variable."""
    env_offline = os.environ.get("TUNE_CIFAR_OFFLINE", "").strip().lower() in ("1", "true", "yes")
    return not offline and (download or not env_offline)


def resolve_data_dir(data_dir: str | None, download: bool, dataset: str | None = None) -> str:
    """Find the data now (a clear error before Ray starts) and pin its absolute path for the workers.

    With a dataset the folder of its pickles is pinned, so that later look-ups (which do not know
    the dataset) find the same data even where CIFAR-10 and CIFAR-100 lie side by side."""
    check_dataset(dataset)
    for _, root in candidate_dirs(data_dir):
        layout = detect_layout(root, dataset)
        if layout:
            return str((layout[1] if dataset else root).resolve())
    return load_cifar10(data_dir, download, dataset=dataset).source      # downloads, or raises the clear error


def train_size(cfg, k: int | None = None) -> int:
    """How many images a config trains on per epoch: the (subset of the) training set less its
    validation share, or less one fold of k (the smallest a fold's training part can be)."""
    n = len(training_labels(cfg))
    n = min(cfg.subset, n) if cfg.subset else n
    return n - math.ceil(n / k if k else cfg.val_fraction * n)


def check_data(cfg) -> None:
    """The training images a config asks for exist (reads every file), its --subset fits them, and
    the stratified validation split can be made."""
    cifar = _loaded(cfg)[1]
    check_subset(cfg.subset, cifar.train_y)
    pool = cifar.train_y[stratified_subset(cifar.train_y, cfg.subset, cfg.split_seed)]
    check_split(pool, cfg.val_fraction, cifar.classes, "validation")


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


def stored_resolution(cfg) -> int | None:
    """The model's input resolution: the bound on the stored size of image folders (None for CIFAR)."""
    from .models import resolve_resolution
    layout = locate(cfg.data_dir)
    return resolve_resolution(cfg.model, cfg.mode, cfg.resolution) if layout and layout[0] == "folders" else None


# --------------------------------------------------------------------------- readers

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


def read_batches(folder: Path) -> Cifar:
    """The official CIFAR-10 python layout: five training pickles + test_batch (+ batches.meta)."""
    parts = [_read_pickle_batch(folder / name) for name in BATCH_FILES]
    test_x, test_y = _read_pickle_batch(folder / "test_batch")
    meta = folder / "batches.meta"
    classes = (_read_names(meta, "label_names", 10) if meta.exists() else None) or CLASSES
    return Cifar(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                 test_x, test_y, classes, source=str(folder), test_source=str(folder / "test_batch"))


def read_cifar100(folder: Path) -> Cifar:
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
    return Cifar(train_x, train_y, test_x, test_y, classes, source=str(folder), test_source=str(folder / "test"))


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


def read_image_folders(root: Path, size: int | None = None, split_seed: int = 0) -> Cifar:
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
    return Cifar(decode_images(files, s), labels, decode_images(test_files, s), test_labels, tuple(classes),
                 source=str(root), test_source=test_source)


def synthetic_cifar(n_train: int = 50_000, n_test: int = 10_000, seed: int = 0) -> Cifar:
    """Random images of the real shape, for benchmarks where only the speed matters."""
    rng = np.random.default_rng(seed)
    return Cifar(rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8),
                 np.arange(n_train, dtype=np.int64) % 10,
                 rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8),
                 np.arange(n_test, dtype=np.int64) % 10, CLASSES, source="synthetic", test_source="synthetic")


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


def kfold_splits(labels: np.ndarray, k: int, seed: int, repeats: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """The K x R (train, validation) splits of repeated stratified K-fold, seeded: every configuration
    of an experiment sees the same splits, so their scores can be compared pairwise."""
    from sklearn.model_selection import RepeatedStratifiedKFold

    folds = RepeatedStratifiedKFold(n_splits=k, n_repeats=repeats, random_state=seed)
    return list(folds.split(np.zeros(len(labels)), labels))


# --------------------------------------------------------------------------- on the device

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


def to_device(cifar: Cifar, train_idx: np.ndarray, val_idx: np.ndarray, device: torch.device,
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


def prepare(cifar: Cifar, subset: int | None, val_fraction: float, split_seed: int,
            device: torch.device, fold: tuple[int, int, int] | str | None = None,
            stream: bool | None = None) -> DeviceData:
    """Subset -> (train, val) split (or split `i` of K-fold repeated R times: fold=(i, K, R); or
    fold=WHOLE_POOL: train on every image of the pool, no validation) -> device. The test set is
    left whole."""
    pool = stratified_subset(cifar.train_y, subset, split_seed)
    if fold == WHOLE_POOL:          # the final retrain of a cross-validated winner
        tr, va = np.arange(len(pool)), np.arange(0)
    elif fold is None:
        tr, va = train_val_split(cifar.train_y[pool], val_fraction, split_seed)
    else:
        i, k, repeats = fold
        tr, va = kfold_splits(cifar.train_y[pool], k, split_seed, repeats)[i]
    return to_device(cifar, pool[tr], pool[va], device, stream)


# --------------------------------------------------------------------------- once per process

WHOLE_POOL = "all"      # device_data(fold=WHOLE_POOL): train on the whole (subset) pool, nothing held out
_LOADED: dict[tuple, Cifar] = {}
_PREPARED: dict[tuple, DeviceData] = {}


def _loaded(cfg, synthetic: bool = False) -> tuple[tuple, Cifar]:
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
        _LOADED[source] = load_cifar10(cfg.data_dir, cfg.download, synthetic, size=source[3] if not synthetic else None,
                                       split_seed=cfg.split_seed)
    return source, _LOADED[source]


def training_labels(cfg) -> np.ndarray:
    """Labels of all training images (subset and split not applied): reads and checks every file."""
    return _loaded(cfg)[1].train_y


def device_data(cfg, fold: tuple[int, int, int] | str | None = None, synthetic: bool = False) -> DeviceData:
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
