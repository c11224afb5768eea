"""The training loop and the plain `train` command on real CIFAR-10 subsets."""
from __future__ import annotations

import json

import pytest
import torch
import torchvision
from conftest import run_cli

from tune_cifar.core.config import TrainConfig
from tune_cifar.data.cache import device_data
from tune_cifar.training.evaluate import evaluate_test
from tune_cifar.training.fit import fit
from tune_cifar.training.step import Runtime, evaluate


@pytest.mark.slow
def test_train_command_learns(cifar_dir, tmp_path):
    rc, out, err = run_cli("train", "simple_cnn_scratch", "--data-dir", cifar_dir, "--subset", 5000, "--epochs", 3,
                           "--evals-per-epoch", 1, "--results-dir", tmp_path, "--name", "t")
    assert rc == 0, err
    last = out.strip().splitlines()[-1]
    assert last.startswith("test_acc=")
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert metrics["test_acc"] == pytest.approx(float(last.split("=")[1]), abs=1e-4)
    assert metrics["test_acc"] > 0.35                      # chance is 0.10
    assert metrics["epochs"] == 3 and len(metrics["history"]) == 3
    assert sum(map(sum, metrics["confusion_matrix"])) == 10_000
    assert (tmp_path / "t" / "model.pt").is_file()
    # the experiment is never overwritten silently
    rc, _, err = run_cli("train", "simple_cnn_scratch", "--data-dir", cifar_dir, "--subset", 5000, "--epochs", 1,
                         "--results-dir", tmp_path, "--name", "t")
    assert rc == 2 and "already exists" in err and len(err.strip().splitlines()) == 1


def test_checkpoint_resume_continues_the_same_run(cifar_dir):
    cfg = TrainConfig(data_dir=str(cifar_dir), subset=2000, epochs=2, width=16, batch_size=64, threads=1,
                      evals_per_epoch=2)
    data = device_data(cfg)
    straight = fit(cfg, data)
    saved = {}

    def stop_after_first_round(record, state):
        saved["state"] = state()
        return True                          # the run is interrupted here
    interrupted = fit(cfg, data, on_round=stop_after_first_round)
    assert interrupted.status == "stopped" and len(interrupted.history) == 1
    capped = fit(cfg, data, max_rounds=1)                   # the other way to stop: a round limit
    assert capped.status == "stopped" and len(capped.history) == 1
    assert capped.history[0]["val_acc"] == pytest.approx(interrupted.history[0]["val_acc"], abs=1e-6)
    resumed = fit(cfg, data, resume=saved["state"])
    assert len(resumed.history) == 4
    for a, b in zip(straight.history, resumed.history):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-4 and abs(a["val_acc"] - b["val_acc"]) < 1e-6
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), k


def test_non_finite_loss_stops_the_run_as_diverged(cifar_dir):
    from tune_cifar.tuning.trainable import nan_outputs_from
    cfg = TrainConfig(data_dir=str(cifar_dir), subset=1000, epochs=3, width=8, batch_size=64)
    rounds: list[int] = []
    with nan_outputs_from(2, rounds):             # the fault injection the search's resilience tests use
        result = fit(cfg, device_data(cfg), on_round=lambda record, _state: rounds.append(record["round"]))
    assert result.status == "diverged" and len(result.history) == 2
    assert result.history[-1]["val_acc"] == 0.0


@pytest.mark.slow
def test_frozen_mode_trains_the_head_on_cached_features(cifar_dir, tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    cfg = TrainConfig(model="resnet18", mode="frozen", resolution=32, weights=str(weights), data_dir=str(cifar_dir),
                      subset=1000, epochs=2, batch_size=64, lr=1e-3, optimizer="adamw", augment="flip",
                      precision="fp32")          # exact agreement below: no bf16 rounding on a bf16 CPU
    data = device_data(cfg)
    result = fit(cfg, data)
    assert result.status == "completed"
    original = torch.load(weights, weights_only=True)
    for key, value in result.model.state_dict().items():          # the backbone did not move
        if not key.startswith("fc."):
            assert torch.equal(value, original[key]), key
    # the head trained on cached features is the same model as the whole network on images
    from tune_cifar.training.features import _CACHE
    (_, feats), = _CACHE.values()
    head_preds = result.model.fc(feats.val.views[0].float()).argmax(1)
    rt = Runtime.of(cfg)
    _, _, whole_net_preds = evaluate(result.model, data.val.batches(100, rt.resolution, channels_last=True), rt)
    assert head_preds.tolist() == whole_net_preds.tolist()
    assert 0 <= evaluate_test(result.model, cfg, data)["test_acc"] <= 1
