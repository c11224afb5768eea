"""bf16 autocast + channels_last on the CPU, every model x mode, through the real `train` command.

Each case trains a few real steps with `--set precision=bf16` and checks what the command wrote:
finite losses, a model.pt that reloads into its architecture (fp32 master weights, frozen backbone
untouched) and runs in bf16 autocast, and the config that says bf16 was in force. `train --resume`
after a Ctrl-C continues the bf16 run from its checkpoint.

The data are real CIFAR-10 images, fewer of them: `train` always evaluates the whole test set, and
10,000 test images cost ~30 s per VGG16 / ResNet18 case on 2 cores, so the runs read a copy of the
official pickles holding the first 400 images of each training batch and the first 200 test images.
"""
from __future__ import annotations

import json
import math
import pickle
import re
import signal
import subprocess
import sys

import pytest
import torch
import torchvision
from conftest import ROOT, run_cli

from tune_cifar.data.store import to_model_input
from tune_cifar.training.models import architecture, entry

TRAIN_PER_BATCH, TEST_IMAGES = 400, 200          # 2,000 training images in all, 200 test images
CASES = [("simple_cnn", "scratch", 32),
         ("alexnet", "scratch", 64), ("alexnet", "frozen", 64), ("alexnet", "full", 64),
         ("vgg16", "scratch", 32), ("vgg16", "frozen", 32), ("vgg16", "full", 32),
         ("resnet18", "scratch", 32), ("resnet18", "frozen", 32), ("resnet18", "full", 32)]
# 90 train / 10 val images, 3 steps of 24: VGG16's steps cost ~1 s each on 2 cores (its 25088 x 4096
# classifier layer, even at 32 px), and each VGG16 run also writes ~1.6 GB of checkpoint and model
SMALL = ["--subset", 100, "--epochs", 1, "--batch-size", 24, "--evals-per-epoch", 1]


@pytest.fixture(scope="module")
def small_cifar(cifar_dir, tmp_path_factory):
    """The official python layout with fewer (real) images per file."""
    src = cifar_dir / "cifar-10-batches-py" if (cifar_dir / "cifar-10-batches-py").is_dir() else cifar_dir
    root = tmp_path_factory.mktemp("small_cifar")
    dst = root / "cifar-10-batches-py"
    dst.mkdir()
    for name, n in [(f"data_batch_{i}", TRAIN_PER_BATCH) for i in range(1, 6)] + [("test_batch", TEST_IMAGES)]:
        with open(src / name, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        small = {k: (v[:n] if k in (b"data", b"labels", b"filenames") else v) for k, v in batch.items()}
        with open(dst / name, "wb") as f:
            pickle.dump(small, f)
    (dst / "batches.meta").write_bytes((src / "batches.meta").read_bytes())
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """ImageNet-shaped state dicts (random values), as `--weights FILE` takes them."""
    d = tmp_path_factory.mktemp("weights")
    files = {}
    for name in ("alexnet", "vgg16", "resnet18"):
        torch.manual_seed(0)
        files[name] = d / f"{name}.pth"
        torch.save(torchvision.models.get_model(name, weights=None).state_dict(), files[name])
    return files


def sample_images(root, resolution: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    with open(root / "cifar-10-batches-py" / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    x = torch.from_numpy(batch[b"data"][:n]).view(n, 3, 32, 32)
    return to_model_input(x, resolution, channels_last=True), torch.tensor(batch[b"labels"][:n])


def epoch_lines(out: str) -> list[str]:
    return re.findall(r"^epoch \S+: .*$", out, flags=re.M)


@pytest.mark.slow
@pytest.mark.parametrize("name,mode,resolution", CASES, ids=[f"{n}_{m}" for n, m, _ in CASES])
def test_bf16_training_on_cpu(name, mode, resolution, small_cifar, weights, tmp_path):
    args = ["train", f"{name}_{mode}", "--data-dir", small_cifar, *SMALL, "--resolution", resolution,
            "--device", "cpu", "--set", "precision=bf16", "--results-dir", tmp_path, "--name", "run"]
    if mode != "scratch":
        args += ["--weights", weights[name]]
    rc, out, err = run_cli(*args)
    assert rc == 0, err

    exp = tmp_path / "run"
    metrics = json.loads((exp / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 1
    (record,) = metrics["history"]
    for key in ("train_loss", "val_loss"):
        assert math.isfinite(record[key]) and record[key] > 0, (key, record)
    assert math.isfinite(metrics["test_loss"]) and 0 <= metrics["test_acc"] <= 1
    assert metrics["precision_used"] == record["precision_used"] == "bf16"     # what ran, not only what was asked
    (printed,) = epoch_lines(out)                               # what was printed is what was written
    assert f"train_loss={record['train_loss']:.4f}" in printed and f"val_loss={record['val_loss']:.4f}" in printed

    saved = torch.load(exp / "model.pt", weights_only=True)
    cfg = saved["config"]
    assert cfg["precision"] == "bf16" and metrics["config"]["precision"] == "bf16"      # bf16 was in force
    assert (cfg["model"], cfg["mode"], cfg["resolution"], cfg["device"]) == (name, mode, resolution, "cpu")
    assert len(saved["classes"]) == 10
    state = saved["model"]
    # autocast computes in bf16 but the trained weights (and BN statistics) stay fp32
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    if mode == "frozen":                                        # only the new head moved
        original = torch.load(weights[name], weights_only=True)
        head = entry(name).head + "."
        for key, value in state.items():
            if not key.startswith(head):
                assert torch.equal(value, original[key]), key

    model = architecture(name, mode, len(saved["classes"]), cfg["width"])
    model.load_state_dict(state)                                # strict: every key, every shape
    model.eval().to(memory_format=torch.channels_last)
    x, _ = sample_images(small_cifar, resolution)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
        reference = model(x)                                    # the same model in fp32
    assert logits.dtype == torch.bfloat16 and logits.shape == (len(x), 10)
    assert torch.isfinite(logits.float()).all()
    scale = reference.abs().max().item() + 1e-3
    assert (logits.float() - reference).abs().max().item() <= 0.1 * scale


@pytest.mark.slow
def test_resume_after_ctrl_c_keeps_bf16_and_finishes(small_cifar, tmp_path):
    """Ctrl-C after the first epoch, then `train --resume` (without --set): the run continues from its
    checkpoint under the saved config (bf16) and finishes the epochs it had left."""
    common = ["--data-dir", small_cifar, "--results-dir", tmp_path, "--name", "r"]
    cmd = [sys.executable, "-m", "tune_cifar", "train", "simple_cnn_scratch", *common, "--subset", 1000,
           "--epochs", 3, "--batch-size", 32, "--evals-per-epoch", 1, "--device", "cpu", "--set", "precision=bf16"]
    # SIG_DFL in the child, so that Python turns SIGINT into KeyboardInterrupt even when this test
    # runs in a background job (which inherits SIGINT as ignored)
    p = subprocess.Popen(list(map(str, cmd)), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in p.stdout:
            if line.startswith("epoch 1:"):             # printed after checkpoint.pt of epoch 1 is written
                p.send_signal(signal.SIGINT)            # epochs 2-3 (~1 s) remain: Ctrl-C lands mid-run
                break
        rest, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, f"not interrupted mid-run (status {p.returncode}): {err}"
    assert "--resume" in err
    exp = tmp_path / "r"
    assert not (exp / "model.pt").exists() and not (exp / "metrics.json").exists()
    checkpoint = torch.load(exp / "checkpoint.pt", weights_only=True)
    done = checkpoint["round"]
    assert 1 <= done < 3 and checkpoint["config"]["precision"] == "bf16" and checkpoint["config"]["epochs"] == 3

    rc, out, err = run_cli("train", "simple_cnn_scratch", *common, "--resume")
    assert rc == 0, err
    printed = epoch_lines(out)
    assert [line.split(":")[0] for line in printed] == [f"epoch {e}" for e in range(done + 1, 4)]
    metrics = json.loads((exp / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 3 and len(metrics["history"]) == 3
    assert metrics["history"][:done] == checkpoint["history"]          # the first epochs were not redone
    assert all(math.isfinite(h["train_loss"]) and math.isfinite(h["val_loss"]) for h in metrics["history"])
    saved = torch.load(exp / "model.pt", weights_only=True)
    assert saved["config"]["precision"] == "bf16" and metrics["config"]["precision"] == "bf16"
    model = architecture("simple_cnn", "scratch", 10, saved["config"]["width"])
    model.load_state_dict(saved["model"])
    x, _ = sample_images(small_cifar, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model.eval()(x).float()).all()


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_on_the_cpu_follows_native_bf16(native, monkeypatch):
    """precision=auto on a CPU: bf16 autocast exactly where the CPU computes bf16 natively (emulated
    bf16 is slower than fp32); an explicit fp32 or bf16 always wins."""
    from tune_cifar.training import step as fit
    from tune_cifar.core.config import TrainConfig
    monkeypatch.setattr(fit, "cpu_has_bf16", lambda: native)
    cfg = TrainConfig(model="simple_cnn", mode="scratch", device="cpu")
    assert fit.Runtime.of(cfg).autocast_dtype == (torch.bfloat16 if native else None)
    assert fit.Runtime.of(cfg).precision_used == ("bf16" if native else "fp32")
    assert fit.Runtime.of(cfg.replace(precision="fp32")).autocast_dtype is None
    assert fit.Runtime.of(cfg.replace(precision="bf16")).autocast_dtype == torch.bfloat16


def test_this_cpu_reports_its_bf16_support():
    """The query itself runs on this torch build and agrees with the CPU's flags."""
    from tune_cifar.training.step import cpu_has_bf16
    flags = set(open("/proc/cpuinfo").read().split())       # Linux, as CI
    assert cpu_has_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})
