"""Data: the real CIFAR-10 loads with the right counts, balance and statistics; the other layouts
load; the on-device augmentation does what it says; bad data folders are clear errors."""
from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch

from tune_cifar.core.config import TrainConfig, UserError
from tune_cifar.data.cache import prepare
from tune_cifar.data.readers import CLASSES
from tune_cifar.data.sources import load_images
from tune_cifar.data.splits import kfold_splits, stratified_subset, train_val_split
from tune_cifar.data.store import augment_batch, to_model_input


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
    assert len(load_images(None).train_y) == 50_000


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
    folder = load_images(tmp_path)
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
        load_images(tmp_path)
    assert "data_batch_3" in str(e.value)


def test_image_folder_errors(tmp_path, cifar):
    from PIL import Image
    for split in ("train", "test"):
        for name in CLASSES:
            (tmp_path / split / name).mkdir(parents=True)
            Image.fromarray(cifar.train_x[0].transpose(1, 2, 0)).save(tmp_path / split / name / "a.png")
    Image.new("RGB", (40, 40)).save(tmp_path / "train" / "cat" / "big.png")     # any size: resized
    assert load_images(tmp_path).train_x.shape == (11, 3, 32, 32)
    (tmp_path / "test" / "truck").rename(tmp_path / "test" / "lorry")
    with pytest.raises(UserError, match="class folders differ .*only in train/: truck; only in test/: lorry"):
        load_images(tmp_path)


def test_missing_and_empty_data_folders(tmp_path, monkeypatch):
    monkeypatch.delenv("TUNE_CIFAR_DATA", raising=False)
    with pytest.raises(UserError, match="does not exist"):
        load_images(tmp_path / "nope")
    with pytest.raises(UserError, match="no CIFAR-10 found .*--data-dir"):
        load_images(tmp_path)
    with pytest.raises(UserError, match="no CIFAR-100 found .*cifar-100-python"):
        load_images(tmp_path, dataset="cifar100")


def test_subset_too_small_for_stratification(cifar):
    with pytest.raises(UserError, match="too small"):
        prepare(cifar, 15, 0.1, 0, torch.device("cpu"))
    assert TrainConfig(subset=100).subset == 100


# --------------------------------------------------------------------------- CIFAR-100

def write_cifar100(folder, per_class=3, test_per_class=1, seed=0, key_type=bytes):
    """The official `cifar-100-python/` layout (train, test, meta pickles; bytes keys as in the tarball),
    with `per_class` random images of each of the 100 classes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    names = [f"class_{i:03d}" for i in range(100)]
    k = key_type if key_type is str else (lambda x: x.encode())
    for split, n in (("train", per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(100), n)
        rng.shuffle(labels)
        batch = {k("data"): rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8),
                 k("fine_labels"): labels.tolist(), k("coarse_labels"): (labels // 5).tolist(),
                 k("filenames"): [f"{i}.png" for i in range(len(labels))], k("batch_label"): split}
        (folder / split).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {k("fine_label_names"): names, k("coarse_label_names"): [f"super_{i}" for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return names


@pytest.mark.parametrize("key_type", [bytes, str])
def test_cifar100_pickles_are_read_with_their_names(tmp_path, key_type):
    names = write_cifar100(tmp_path / "cifar-100-python", key_type=key_type)
    for where in (tmp_path, tmp_path / "cifar-100-python"):
        data = load_images(where)
        assert data.classes == tuple(names) and len(data.classes) == 100
        assert data.train_x.shape == (300, 3, 32, 32) and data.test_x.shape == (100, 3, 32, 32)
        assert np.bincount(data.train_y).tolist() == [3] * 100
        assert data.test_source.endswith("cifar-100-python/test")
    raw = pickle.loads((tmp_path / "cifar-100-python" / "train").read_bytes())
    np.testing.assert_array_equal(data.train_y, raw[key_type("fine_labels") if key_type is str else b"fine_labels"])


def test_cifar100_next_to_cifar10_is_chosen_by_dataset(tmp_path, cifar_dir):
    from tune_cifar.data.sources import resolve_data_dir
    write_cifar100(tmp_path / "cifar-100-python")
    (tmp_path / "cifar-10-batches-py").symlink_to(cifar_dir / "cifar-10-batches-py")
    assert len(load_images(tmp_path, dataset="cifar100").classes) == 100
    pinned = resolve_data_dir(str(tmp_path), False, "cifar100")
    assert pinned == str((tmp_path / "cifar-100-python").resolve())
    assert len(load_images(pinned).classes) == 100          # what the workers read without --dataset
    assert resolve_data_dir(str(tmp_path), False) == str(tmp_path.resolve())     # default: CIFAR-10 first
    assert load_images(tmp_path, dataset="cifar10").classes == CLASSES


def test_cifar100_download_is_offered_offline(tmp_path, monkeypatch):
    """Nothing on disk, downloads forbidden: the error names CIFAR-100 (with downloads allowed,
    torchvision's CIFAR100 would fetch it into the cache; there is no network here)."""
    import tune_cifar.data.sources as data
    monkeypatch.delenv("TUNE_CIFAR_DATA", raising=False)
    monkeypatch.setattr(data, "DEFAULT_CACHE", tmp_path / "cache")
    with pytest.raises(UserError, match="no CIFAR-100 found"):
        data.resolve_data_dir(None, False, "cifar100")
    fetched = []

    class FakeCIFAR100:
        def __init__(self, root, train, download):
            fetched.append((root, train, download))
            write_cifar100(tmp_path / "cache" / "cifar-100-python")
    import torchvision
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", FakeCIFAR100)
    pinned = data.resolve_data_dir(None, True, "cifar100")
    assert fetched == [(str(tmp_path / "cache"), True, True)]
    assert pinned.endswith("cifar-100-python") and len(load_images(pinned).classes) == 100


@pytest.mark.parametrize("damage, message", [
    ("label_100", r"labels outside 0\.\.99"),
    ("no_fine_labels", "no 'data' / 'fine_labels' keys"),
    ("names_99", "99 fine_label_names, expected 100"),
    ("missing_test", "test: missing CIFAR-100 pickle file"),
])
def test_damaged_cifar100_is_a_clear_error(tmp_path, damage, message):
    folder = tmp_path / "cifar-100-python"
    names = write_cifar100(folder)
    if damage == "label_100":
        batch = pickle.loads((folder / "train").read_bytes())
        batch[b"fine_labels"][0] = 100
        (folder / "train").write_bytes(pickle.dumps(batch))
    elif damage == "no_fine_labels":
        batch = pickle.loads((folder / "train").read_bytes())
        batch[b"labels"] = batch.pop(b"fine_labels")
        (folder / "train").write_bytes(pickle.dumps(batch))
    elif damage == "names_99":
        (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": names[:99]}))
    else:
        (folder / "test").unlink()
    with pytest.raises(UserError, match=message) as e:
        load_images(tmp_path)
    assert str(folder) in str(e.value)


def test_cifar10_labels_are_checked_against_ten_classes(cifar_dir, tmp_path):
    dst = _copy_batches(cifar_dir, tmp_path)
    (dst / "data_batch_2").write_bytes(pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]}))
    with pytest.raises(UserError, match=r"data_batch_2: labels outside 0\.\.9"):
        load_images(tmp_path)


# --------------------------------------------------------------------------- streaming

def test_streaming_decision():
    from tune_cifar.data.store import streams
    gib = 1 << 30
    assert not streams(150 << 20, "cuda", 70 * gib)          # CIFAR: resident
    assert not streams(int(7.5 * gib), "cuda", 70 * gib)     # 50,000 images at 224 px on an H100: resident
    assert streams(int(7.5 * gib), "cuda", 10 * gib)         # ... on a 10 GiB card (half of 9 GiB free): streamed
    assert not streams(4 * gib, "cuda", 9 * gib) and streams(4 * gib + 1, "cuda", 9 * gib)   # the exact edge
    assert streams(1, "cuda", 512 << 20)                      # less free than the reserve
    assert not streams(100 * gib, "cpu", None)                # the CPU's device is host memory: never
    assert not streams(100 * gib, "cpu", 1)


def test_streamed_split_gives_the_same_batches(cifar):
    """The streamed path (host rows gathered into a staging buffer, copied per batch) yields exactly
    the resident path's batches; here on the CPU, where prepare() itself never streams."""
    cpu = torch.device("cpu")
    resident = prepare(cifar, 600, 0.1, 0, cpu, stream=False)
    streamed = prepare(cifar, 600, 0.1, 0, cpu, stream=True)
    assert streamed.streamed and not resident.streamed and streamed.train.x.shape[0] == 50_000   # no copy
    assert len(streamed.train) == len(resident.train) == 540 and len(streamed.test) == 10_000
    order = torch.randperm(540, generator=torch.Generator().manual_seed(0))
    for split, kw in (("train", dict(order=order, augment="crop_flip")), ("val", {}), ("test", {})):
        a = list(getattr(resident, split).batches(128, 32, generator=torch.Generator().manual_seed(1), **kw))
        b = list(getattr(streamed, split).batches(128, 32, generator=torch.Generator().manual_seed(1), **kw))
        assert len(a) == len(b) > 0
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.slow
def test_dataset_flag_trains_cifar100_through_the_cli(tmp_path, cli, monkeypatch):
    import json

    from conftest import TINY

    import tune_cifar.data.sources as data
    monkeypatch.delenv("TUNE_CIFAR_DATA", raising=False)
    monkeypatch.setattr(data, "DEFAULT_CACHE", tmp_path / "cache")
    rc, _, err = cli("train", TINY, "--dataset", "cifar100", "--offline", "--results-dir", tmp_path / "r")
    assert rc == 2 and "no CIFAR-100 found" in err and not (tmp_path / "r").exists()
    names = write_cifar100(tmp_path / "both" / "cifar-100-python", per_class=10)
    rc, out, err = cli("train", TINY, "--dataset", "cifar100", "--data-dir", tmp_path / "both", "--epochs", 1,
                       "--offline", "--results-dir", tmp_path / "r", "--name", "c100")
    assert rc == 0, err
    metrics = json.loads((tmp_path / "r" / "c100" / "metrics.json").read_text())
    assert [c["class"] for c in metrics["per_class"]] == names
    assert np.array(metrics["confusion_matrix"]).shape == (100, 100)
    assert metrics["config"]["data_dir"] == str((tmp_path / "both" / "cifar-100-python").resolve())
    assert torch.load(tmp_path / "r" / "c100" / "model.pt", weights_only=True)["model"]["fc.weight"].shape[0] == 100
