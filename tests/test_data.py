"""Data: the real CIFAR-10 loads with the right counts, balance and statistics; the other layouts
load; the on-device augmentation does what it says; bad data folders are clear errors."""
from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch

from tune_cifar.config import TrainConfig, UserError
from tune_cifar.data import (
    CLASSES,
    augment_batch,
    kfold_splits,
    load_cifar10,
    prepare,
    stratified_subset,
    to_model_input,
    train_val_split,
)


def test_counts_balance_and_pixel_statistics(cifar):
    assert cifar.train_x.shape == (50_000, 3, 32, 32) and cifar.train_x.dtype == np.uint8
    assert cifar.test_x.shape == (10_000, 3, 32, 32)
    assert np.bincount(cifar.train_y).tolist() == [5000] * 10
    assert np.bincount(cifar.test_y).tolist() == [1000] * 10
    assert cifar.classes == CLASSES
    mean = cifar.train_x.reshape(50_000, 3, -1).mean(axis=(0, 2)) / 255
    std = (cifar.train_x.reshape(50_000, 3, -1) / 255).std(axis=(0, 2))
    np.testing.assert_allclose(mean, [0.4914, 0.4822, 0.4465], atol=1e-3)
    np.testing.assert_allclose(std, [0.2470, 0.2435, 0.2616], atol=1e-3)
    assert cifar.train_y[:5].tolist() == [6, 9, 9, 4, 1] and cifar.test_y[:5].tolist() == [3, 8, 8, 0, 6]


def test_lookup_order_env_variable(cifar_dir, monkeypatch):
    monkeypatch.setenv("TUNE_CIFAR_DATA", str(cifar_dir))
    assert len(load_cifar10(None).train_y) == 50_000


def test_image_folder_layout_matches_the_pickles(cifar, tmp_path):
    from PIL import Image
    picked = {}
    for split, x, y in (("train", cifar.train_x, cifar.train_y), ("test", cifar.test_x, cifar.test_y)):
        for c, name in enumerate(CLASSES):
            idx = np.flatnonzero(y == c)[:6]
            picked[(split, name)] = x[idx]
            (tmp_path / split / name).mkdir(parents=True)
            for i, img in enumerate(x[idx]):
                Image.fromarray(img.transpose(1, 2, 0)).save(tmp_path / split / name / f"{i:03d}.png")
    folder = load_cifar10(tmp_path)
    assert folder.train_x.shape == (60, 3, 32, 32) and folder.test_x.shape == (60, 3, 32, 32)
    assert folder.classes == CLASSES          # alphabetical folder order = CIFAR's label order
    for c, name in enumerate(CLASSES):
        np.testing.assert_array_equal(folder.train_x[folder.train_y == c], picked[("train", name)])


def test_stratified_subset_split_and_folds(cifar):
    idx = stratified_subset(cifar.train_y, 5000, seed=0)
    assert len(idx) == 5000 and np.bincount(cifar.train_y[idx]).tolist() == [500] * 10
    np.testing.assert_array_equal(idx, stratified_subset(cifar.train_y, 5000, seed=0))
    tr, va = train_val_split(cifar.train_y[idx], 0.1, seed=0)
    assert len(va) == 500 and not set(tr) & set(va)
    assert np.bincount(cifar.train_y[idx][va]).tolist() == [50] * 10
    labels = cifar.train_y[idx]
    folds = kfold_splits(labels, 3, seed=0)
    validated = np.concatenate([v for _, v in folds])
    assert sorted(validated.tolist()) == list(range(5000))       # every index validated exactly once
    for train, val in folds:
        assert not set(train) & set(val)
        counts = np.bincount(labels[val], minlength=10)
        assert counts.max() - counts.min() <= 1                   # stratified


def test_prepare_puts_uint8_on_the_device(cifar):
    data = prepare(cifar, 2000, 0.1, 0, torch.device("cpu"))
    assert data.train.x.dtype == torch.uint8 and len(data.train) == 1800 and len(data.val) == 200
    assert len(data.test) == 10_000


def test_augmentation_is_a_reflected_shift_or_flip():
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    out = augment_batch(x, "crop_flip", g)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    padded = torch.nn.functional.pad(x.float(), (4, 4, 4, 4), mode="reflect")
    for i in range(8):     # every output is some 32x32 window of the reflect-padded image, maybe flipped
        found = any(torch.equal(cand, out[i].float()) or torch.equal(cand.flip(2), out[i].float())
                    for dy in range(9) for dx in range(9) for cand in [padded[i, :, dy:dy + 32, dx:dx + 32]])
        assert found
    flipped = augment_batch(x, "flip", g)
    assert all(torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(2)) for i in range(64))


def test_model_input_is_normalised_and_resized(cifar):
    x = torch.from_numpy(cifar.train_x[:512])
    out = to_model_input(x, 64)
    assert out.shape == (512, 3, 64, 64) and out.dtype == torch.float32
    assert abs(out.mean().item()) < 0.15 and 0.8 < out.std().item() < 1.2


def _copy_batches(cifar_dir, tmp_path):
    dst = tmp_path / "cifar-10-batches-py"
    shutil.copytree(cifar_dir / "cifar-10-batches-py", dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


@pytest.mark.parametrize("damage, message", [
    ("truncate", "not a readable CIFAR-10 batch"),
    ("garbage", "not a readable CIFAR-10 batch"),
    ("wrong_shape", r"expected uint8 \(N, 3072\)"),
    ("missing_file", "missing CIFAR-10 batch file"),
])
def test_damaged_batch_files_are_clear_errors(cifar_dir, tmp_path, damage, message):
    dst = _copy_batches(cifar_dir, tmp_path)
    target = dst / "data_batch_3"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:1000])
    elif damage == "garbage":
        target.write_bytes(b"this is not a pickle")
    elif damage == "wrong_shape":
        target.write_bytes(pickle.dumps({b"data": np.zeros((10, 100), np.uint8), b"labels": [0] * 10}))
    else:
        target.unlink()
    with pytest.raises(UserError, match=message) as e:
        load_cifar10(tmp_path)
    assert "data_batch_3" in str(e.value)


def test_image_folder_errors(tmp_path, cifar):
    from PIL import Image
    for split in ("train", "test"):
        for name in CLASSES:
            (tmp_path / split / name).mkdir(parents=True)
            Image.fromarray(cifar.train_x[0].transpose(1, 2, 0)).save(tmp_path / split / name / "a.png")
    Image.new("RGB", (40, 40)).save(tmp_path / "train" / "cat" / "big.png")
    with pytest.raises(UserError, match="big.png: image is 40x40, expected 32x32"):
        load_cifar10(tmp_path)
    (tmp_path / "train" / "cat" / "big.png").unlink()
    (tmp_path / "test" / "truck").rename(tmp_path / "test" / "lorry")
    with pytest.raises(UserError, match="class folders differ"):
        load_cifar10(tmp_path)


def test_missing_and_empty_data_folders(tmp_path, monkeypatch):
    monkeypatch.delenv("TUNE_CIFAR_DATA", raising=False)
    with pytest.raises(UserError, match="does not exist"):
        load_cifar10(tmp_path / "nope")
    with pytest.raises(UserError, match="no CIFAR-10 found .*--data-dir"):
        load_cifar10(tmp_path)


def test_subset_too_small_for_stratification(cifar):
    with pytest.raises(UserError, match="too small"):
        prepare(cifar, 15, 0.1, 0, torch.device("cpu"))
    assert TrainConfig(subset=100).subset == 100
