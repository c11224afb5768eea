"""Any image-folder data set: train/<class>/* (+ test/<class>/*), N >= 2 classes, images of any size,
mode and format. Readers, the held-out test split, bad data, and the whole CLI (train, search,
kfold, export) on a 3-class folder built from real CIFAR-10 images."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY
from PIL import Image

from tune_cifar.core.config import TrainConfig, UserError
from tune_cifar.data.cache import device_data
from tune_cifar.data.readers import HELD_OUT_TEST, choose_stored_size
from tune_cifar.data.sources import detect_layout, load_images

SIZES = (32, 40, 64)
MODES = ("RGB", "L", "RGBA", "P")
PICK = {"cat": 3, "ship": 8, "truck": 9}          # folder name -> CIFAR-10 label


def save_as(img: np.ndarray, path_stem: Path, i: int) -> Path:
    """A CIFAR image (3, 32, 32) saved at the i-th size / mode, as PNG or (RGB / L only) JPEG."""
    im = Image.fromarray(img.transpose(1, 2, 0))
    size, mode = SIZES[i % len(SIZES)], MODES[i % len(MODES)]
    if size != 32:
        im = im.resize((size, size), Image.Resampling.BICUBIC)
    if mode == "P":
        im = im.quantize(64)
    elif mode == "RGBA":
        im = im.convert("RGBA")
        im.putalpha(200)
    else:
        im = im.convert(mode)
    suffix = ".jpg" if mode in ("RGB", "L") and (i // len(MODES)) % 2 else ".png"
    path = path_stem.with_suffix(suffix)
    im.save(path, quality=95) if suffix == ".jpg" else im.save(path)
    return path


def build_folder(root: Path, cifar, n_train: int, n_test: int | None) -> Path:
    for split, x, y, n in (("train", cifar.train_x, cifar.train_y, n_train),
                           ("test", cifar.test_x, cifar.test_y, n_test)):
        if n is None:
            continue
        for name, label in PICK.items():
            (root / split / name).mkdir(parents=True)
            for i, idx in enumerate(np.flatnonzero(y == label)[:n]):
                save_as(x[idx], root / split / name / f"{i:04d}", i)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory, cifar):
    """3 classes of real CIFAR-10 images: 200 a class in train/, 30 in test/, mixed sizes / modes / formats."""
    return build_folder(tmp_path_factory.mktemp("imgs"), cifar, 200, 30)


def tiny_folder(root: Path, classes=("a", "b"), per_class=5, split="train") -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


# --------------------------------------------------------------------------- readers

def test_mixed_sizes_and_modes_become_rgb_at_the_stored_size(folder, cifar):
    files = sorted((folder / "train" / "cat").iterdir())
    assert {Image.open(f).mode for f in files} == set(MODES)
    assert {Image.open(f).size[0] for f in files} == set(SIZES)
    assert {f.suffix for f in files} == {".png", ".jpg"}
    data = load_images(folder, size=32)
    assert data.classes == ("cat", "ship", "truck")
    assert data.train_x.shape == (600, 3, 32, 32) and data.train_x.dtype == np.uint8
    assert data.test_x.shape == (90, 3, 32, 32)
    assert np.bincount(data.train_y).tolist() == [200] * 3 and np.bincount(data.test_y).tolist() == [30] * 3
    assert data.test_source == str(folder / "test")
    original = cifar.train_x[np.flatnonzero(cifar.train_y == 3)]
    # 0000.png: 32 px RGB PNG, stored unchanged; 0001: 40 px grayscale -> three equal channels
    np.testing.assert_array_equal(data.train_x[0], original[0])
    gray = data.train_x[1]
    assert np.array_equal(gray[0], gray[1]) and np.array_equal(gray[0], gray[2])
    # every image, whatever its size / mode / format, is close to the CIFAR original it was made from
    err = np.abs(data.train_x[:200].astype(float) - original[:200]).mean(axis=(1, 2, 3))
    assert err.max() < 40 and np.median(err) < 12
    # without a size bound the images' own size (90th percentile of short sides) is kept
    assert load_images(folder).train_x.shape[-1] == 64


def test_stored_size_choice():
    sides = np.array([32] * 50 + [40] * 30 + [64] * 20)
    assert choose_stored_size(sides, 100, None) == 64
    assert choose_stored_size(sides, 100, 32) == 32                  # the model's resolution bounds it
    assert choose_stored_size(np.array([500] * 9 + [4000]), 10, 224) == 224
    assert choose_stored_size(np.array([32] * 95 + [1000] * 5), 100, 224) == 32     # outliers do not set it
    assert choose_stored_size(np.array([500]), 10_000, 224) == 224                  # 1.5 GB
    assert choose_stored_size(np.array([500]), 50_000, 224) == 169                  # 4 GiB budget
    assert choose_stored_size(np.array([500]), 10_000_000, 224) == 32               # never below 32


def test_held_out_test_split_is_stratified_seeded_and_recorded(tmp_path, cifar):
    root = build_folder(tmp_path, cifar, 25, None)
    assert detect_layout(root) == ("folders", root)                   # train/ alone is a data set
    a = load_images(root, size=32, split_seed=0)
    assert len(a.train_y) == 60 and len(a.test_y) == 15 == int(HELD_OUT_TEST * 75)
    assert np.bincount(a.test_y).tolist() == [5] * 3                  # stratified
    assert a.test_source == f"held out 20% of {root / 'train'} (stratified, seed 0; there is no test/ folder)"
    flat = lambda x: {im.tobytes() for im in x}                       # noqa: E731
    assert not flat(a.train_x) & flat(a.test_x) and len(flat(a.train_x) | flat(a.test_x)) == 75
    again, other = load_images(root, size=32, split_seed=0), load_images(root, size=32, split_seed=1)
    np.testing.assert_array_equal(a.test_x, again.test_x)
    assert flat(other.test_x) != flat(a.test_x) and "seed 1" in other.test_source


def test_device_data_cache_follows_resolution_and_split_seed(tmp_path, cifar):
    root = build_folder(tmp_path, cifar, 25, None)
    cfg = TrainConfig(data_dir=str(root), device="cpu", val_fraction=0.2)
    d32 = device_data(cfg)
    assert d32.train.x.shape[-1] == 32 and d32.classes == ("cat", "ship", "truck")
    assert "held out 20%" in d32.test_source and not d32.streamed
    assert device_data(cfg.replace(model="alexnet")).train.x.shape[-1] == 64     # alexnet scratch: 64 px
    assert device_data(cfg.replace(resolution=48)).train.x.shape[-1] == 48
    seed1 = device_data(cfg.replace(split_seed=1))
    assert "seed 1" in seed1.test_source and not torch.equal(seed1.test.x, d32.test.x)


# --------------------------------------------------------------------------- bad data

def corrupt(root: Path) -> Path:
    bad = root / "train" / "b" / "2.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return bad


def truncated(root: Path) -> Path:
    bad = root / "train" / "a" / "x.jpg"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 100).save(bad)
    bad.write_bytes(bad.read_bytes()[:300])
    return bad


@pytest.mark.parametrize("case, message, names", [
    ("empty_class", "empty class folder", "train/b"),
    ("single_class", "one class folder .*at least 2 classes", "train"),
    ("no_class_folders", "no class folders", "train"),
    ("corrupt", "unreadable image", "train/b/2.png"),
    ("truncated", "unreadable image", "train/a/x.jpg"),
    ("text_file", "unreadable image", "train/a/notes.jpg"),
    ("classes_differ", "class folders differ .*only in train/: b; only in test/: c", ""),
    ("empty_test_class", "empty class folder", "test/b"),
    ("too_few_to_hold_out", "4 image.*at least 5 images per class", "train/b"),
])
def test_bad_data_is_a_user_error_naming_the_place(tmp_path, case, message, names):
    root = tiny_folder(tmp_path)
    if case == "empty_class":
        for f in (root / "train" / "b").iterdir():
            f.unlink()
        (root / "train" / "b" / ".DS_Store").write_bytes(b"")           # not an image
    elif case == "single_class":
        root = tiny_folder(tmp_path / "one", classes=("only",))
    elif case == "no_class_folders":
        root = tmp_path / "flat"
        (root / "train").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / "train" / "x.png")
    elif case == "corrupt":
        corrupt(root)
    elif case == "truncated":
        truncated(root)
    elif case == "text_file":
        (root / "train" / "a" / "notes.jpg").write_text("not an image")
    elif case == "classes_differ":
        tiny_folder(root, classes=("a", "c"), split="test")
    elif case == "empty_test_class":
        tiny_folder(root, split="test")
        for f in (root / "test" / "b").iterdir():
            f.unlink()
    else:
        (root / "train" / "b" / "0.png").unlink()
    with pytest.raises(UserError, match=message) as e:
        load_images(root, size=32)
    where = str(root / names) if names else str(root)
    assert where in str(e.value)


def test_bad_data_through_the_cli_writes_nothing(tmp_path, cli):
    root = tiny_folder(tmp_path / "data", per_class=10)
    bad = corrupt(root)
    rc, out, err = cli("train", TINY, "--data-dir", root, "--results-dir", tmp_path / "results", "--offline")
    assert rc == 2 and err.count("\n") == 1 and str(bad) in err and "unreadable image" in err
    assert not (tmp_path / "results").exists()


def test_a_split_too_small_for_validation_is_caught_before_training(tmp_path, cli):
    root = tiny_folder(tmp_path / "data", per_class=5)           # 4 + 4 training images after the held-out test
    rc, _, err = cli("train", TINY, "--data-dir", root, "--results-dir", tmp_path / "results", "--offline")
    assert rc == 2 and "stratified split needs at least one of each class" in err
    assert not (tmp_path / "results").exists()


# --------------------------------------------------------------------------- end to end, through the CLI

def check_three_classes(summary: dict, n_test: int = 90) -> None:
    names = ["cat", "ship", "truck"]
    assert [c["class"] for c in summary["per_class"]] == names
    assert [c["support"] for c in summary["per_class"]] == [n_test // 3] * 3
    cm = np.array(summary["confusion_matrix"])
    assert cm.shape == (3, 3) and cm.sum() == n_test


@pytest.mark.slow
def test_train_search_kfold_export_on_a_three_class_folder(folder, tmp_path, cli, ray_session):
    results = tmp_path / "results"
    data = ("--data-dir", folder, "--results-dir", results, "--offline")

    rc, out, err = cli("train", TINY, "--epochs", 5, "--name", "t", *data)
    assert rc == 0, err
    metrics = json.loads((results / "t" / "metrics.json").read_text())
    check_three_classes(metrics)
    assert metrics["test_acc"] > 0.45                     # 3 classes: chance is 1/3 (0.61 with these seeds)
    assert torch.load(results / "t" / "model.pt", weights_only=True)["classes"] == ["cat", "ship", "truck"]

    rc, out, err = cli("search", TINY, "--num-samples", 3, "--max-epochs", 1, "--name", "s", "--no-report", *data)
    assert rc == 0, err
    best = json.loads((results / "s" / "best.json").read_text())
    assert best["classes"] == ["cat", "ship", "truck"]
    check_three_classes(best)

    rc, out, err = cli("kfold", TINY, "--k", 3, "--num-samples", 2, "--epochs", 1, "--name", "k", "--no-report", *data)
    assert rc == 0, err
    assert (results / "k" / "kfold.csv").is_file()

    rc, out, err = cli("export", "s", "--format", "onnx", "--results-dir", results)
    assert rc == 0, err
    onnx_file = Path(out.strip().splitlines()[-1])
    meta = json.loads(onnx_file.with_name(onnx_file.name + ".json").read_text())
    assert meta["classes"] == ["cat", "ship", "truck"] and meta["num_classes"] == 3 and meta["resolution"] == 32
    import onnx
    graph = onnx.load(str(onnx_file)).graph
    assert graph.output[0].type.tensor_type.shape.dim[1].dim_value == 3
