"""Finding the data: --data-dir, then $TUNE_CIFAR_DATA, then the cache folder; torchvision's
download of CIFAR-10 / CIFAR-100 there when nothing is on disk and downloads are allowed
(`--dataset cifar100` asks for CIFAR-100; without it CIFAR-10 is downloaded)."""
from __future__ import annotations

import os
from pathlib import Path

from ..core.config import UserError
from .readers import ImageSet, read_batches, read_cifar100, read_image_folders, synthetic_images

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tune_cifar" / "data"
DATASETS = ("cifar10", "cifar100")
PICKLE_DIRS = {"batches": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


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


def load_images(data_dir: str | os.PathLike | None = None, download: bool = False,
                 synthetic: bool = False, *, dataset: str | None = None, size: int | None = None,
                 split_seed: int = 0) -> ImageSet:
    """The data set in `data_dir` (else $TUNE_CIFAR_DATA, else the cache; downloaded there when allowed).

    dataset: restrict the search to 'cifar10' or 'cifar100' (and download that one when missing).
    size: the model's input resolution, an upper bound of the stored size of image folders.
    split_seed: seeds the test share held out of train/ when an image folder has no test/."""
    if synthetic:
        return synthetic_images()
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


def read_layout(layout: tuple[str, Path], size: int | None = None, split_seed: int = 0) -> ImageSet:
    kind, where = layout
    if kind == "batches":
        return read_batches(where)
    if kind == "cifar100":
        return read_cifar100(where)
    return read_image_folders(where, size, split_seed)


def torchvision_download(root: Path, dataset: str = "cifar10") -> ImageSet:
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
    return load_images(data_dir, download, dataset=dataset).source      # downloads, or raises the clear error

