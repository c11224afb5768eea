"""What a real user runs into on their own machine: bad values that used to slip through, plans that
changed on --resume, downloads, machine-sized defaults, an installed wheel. Each test failed before
its fix. No Ray is started here: every check comes before it."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from conftest import ROOT, TINY, run_cli

from tune_cifar.core.config import TrainConfig, UserError
from tune_cifar.results.folders import start_experiment, write_json


def one_line_error(rc, err, *needles):
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("args, message", [
    (["train", TINY, "--set", "colour=red"], "unknown key 'colour'"),
    (["kfold", TINY, "--set", "colour=red"], "unknown key 'colour'"),
    (["train", TINY, "--lr", "nan"], "lr=nan must be in (0, 10]"),
    (["search", TINY, "--grace-period", "nan"], "grace_period must be > 0"),
    (["search", TINY, "--max-failures", "-1"], "--max-failures=-1 must be >= 0"),
    (["train", TINY, "--batch-size", "100000000", "--subset", "2000"], "batch_size=100000000 is larger than the 1800"),
    (["train", TINY, "--subset", "200", "--batch-size", "64", "--evals-per-epoch", "4"],
     "has 2 full batch(es) of 64, fewer than evals_per_epoch=4"),
    # the space's evals_per_epoch is fitted to a small split (core/fitting.py); one given with --set is not
    (["kfold", TINY, "--subset", "200", "--k", "3", "--set", "batch_size=128", "--set", "evals_per_epoch=2"],
     "kfold configuration: an epoch of 133 training images has 1 full batch(es) of 128"),
])
def test_values_that_slipped_through_are_one_line_errors(args, message, cli, cifar_dir, tmp_path):
    rc, _, err = cli(*args, "--data-dir", cifar_dir, "--results-dir", tmp_path / "r")
    one_line_error(rc, err, message)
    assert not (tmp_path / "r").exists()


def test_an_int_for_a_float_field_becomes_a_float(cifar_dir, tmp_path):
    from tune_cifar.commands.kfold import KFoldOptions, plan_kfold
    plan = plan_kfold(TINY, KFoldOptions(k=3, fixed={"lr": 1}, data_dir=str(cifar_dir), subset=1500,
                                         results_dir=tmp_path))
    lr = plan.record()["candidates"][0]["lr"]
    assert lr == 1.0 and isinstance(lr, float)
    assert not plan.exp.exists()                              # planning writes nothing


@pytest.mark.slow
def test_resume_takes_the_saved_plan_not_the_flags_or_an_edited_file(cifar_dir, tmp_path):
    from tune_cifar.commands.search import SearchOptions, plan_search
    space = tmp_path / "mine.yaml"
    space.write_text(Path(TINY).read_text())
    opts = SearchOptions(results_dir=tmp_path, name="q", quick=True, data_dir=str(cifar_dir))
    first = plan_search(str(space), opts)
    start_experiment(first.exp, overwrite=False)              # what run() does before it is interrupted
    write_json(first.exp / "plan.json", first.record())
    doc = yaml.safe_load(space.read_text())
    doc["budget"]["max_epochs"] = 9                           # edited while the experiment was interrupted
    space.write_text(yaml.safe_dump(doc))
    resumed = plan_search(str(space), SearchOptions(results_dir=tmp_path, name="q", resume=True))
    assert resumed.record()["spec"] == first.record()["spec"]
    assert resumed.record()["spec"]["budget"]["max_epochs"] == 4      # --quick's, not the file's 9
    assert resumed.opts.subset == 10000 and resumed.opts.quick
    with pytest.raises(UserError, match="--max-epochs 7 contradicts the saved plan"):
        plan_search(str(space), SearchOptions(results_dir=tmp_path, name="q", resume=True, max_epochs=7))
    with pytest.raises(UserError, match="was planned from"):
        plan_search(TINY, SearchOptions(results_dir=tmp_path, name="q", resume=True))


def test_early_stopping_survives_a_resume(cifar_dir):
    """patience counts evaluations without improvement: the count is rebuilt from the history."""
    from tune_cifar.data.cache import device_data
    from tune_cifar.training.fit import fit, rounds_since_best
    cfg = TrainConfig(data_dir=str(cifar_dir), subset=1000, epochs=3, width=8, batch_size=64, patience=1,
                      evals_per_epoch=2)
    data = device_data(cfg)
    saved = {}

    def interrupt(record, state):
        saved["state"] = state()
        return True
    fit(cfg, data, on_round=interrupt)
    state = saved["state"]
    state["history"][0]["val_loss"] = 0.0       # round 1 was unbeatable: round 2 cannot improve on it
    resumed = fit(cfg, data, resume=state)
    assert resumed.status == "early_stopped" and len(resumed.history) == 2
    assert rounds_since_best([{"val_loss": v} for v in (2.0, 1.0, 1.5, 1.2, 0.5, 0.6)]) == 1


@pytest.mark.slow
def test_in_process_runs_record_their_own_command(cli, cifar_dir, tmp_path):
    args = ["train", TINY, "--data-dir", str(cifar_dir), "--subset", "500", "--epochs", "1", "--results-dir",
            str(tmp_path), "--name", "t"]
    rc, _, err = cli(*args)
    assert rc == 0, err
    command = yaml.safe_load((tmp_path / "t" / "spec.yaml").read_text())["command"]
    assert command == "python -m tune_cifar " + shlex.join(args)        # not pytest's own sys.argv


def test_result_files_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_json(tmp_path / "best.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_overwrite_clears_tune_state_in_a_separate_storage(tmp_path):
    exp, storage = tmp_path / "results" / "e", tmp_path / "shared" / "e"
    (storage / "tune" / "trial_1_x").mkdir(parents=True)
    exp.mkdir(parents=True)
    (exp / "old.csv").write_text("x")
    start_experiment(exp, overwrite=True, storage=str(storage))
    assert not (storage / "tune").exists() and exp.is_dir() and not (exp / "old.csv").exists()


def test_checkpoints_are_read_with_weights_only(cifar_dir, tmp_path):
    """train --resume reads checkpoint.pt with weights_only=True: a pickled object is refused."""
    rc, _, err = run_cli("train", TINY, "--data-dir", cifar_dir, "--subset", 500, "--epochs", 2,
                         "--results-dir", tmp_path, "--name", "t")
    assert rc == 0, err
    state = torch.load(tmp_path / "t" / "checkpoint.pt", weights_only=True)     # loads as plain data
    state["evil"] = argparse.Namespace(code="anything a pickle can run")
    torch.save(state, tmp_path / "t" / "checkpoint.pt")
    rc, _, err = run_cli("train", TINY, "--resume", "--results-dir", tmp_path, "--name", "t")
    one_line_error(rc, err, "checkpoint.pt", "not a plain checkpoint")


# --------------------------------------------------------------------------- online by default

OFFLINE_NET = {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "no_proxy": ""}


def test_missing_data_is_downloaded_and_a_failed_download_is_one_line(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "TUNE_CIFAR_DATA": "", **OFFLINE_NET}
    rc, _, err = run_cli("train", TINY, "--results-dir", tmp_path / "r", env=env)
    one_line_error(rc, err, "downloading CIFAR-10 into", "pass --data-dir")
    rc, _, err = run_cli("train", TINY, "--offline", "--results-dir", tmp_path / "r", env=env)
    one_line_error(rc, err, "no CIFAR-10 found")
    rc, _, err = run_cli("train", TINY, "--results-dir", tmp_path / "r", env={**env, "TUNE_CIFAR_OFFLINE": "1"})
    one_line_error(rc, err, "no CIFAR-10 found")
    assert not (tmp_path / "r").exists()


def test_missing_imagenet_weights_are_downloaded_and_a_failed_download_is_one_line(cifar_dir, tmp_path):
    env = {"TORCH_HOME": str(tmp_path / "torch"), **OFFLINE_NET}
    rc, _, err = run_cli("train", "resnet18_frozen", "--data-dir", cifar_dir, "--results-dir", tmp_path / "r", env=env)
    one_line_error(rc, err, "downloading ResNet18_Weights.IMAGENET1K_V1 failed", "--weights")
    rc, _, err = run_cli("train", "resnet18_frozen", "--offline", "--data-dir", cifar_dir,
                         "--results-dir", tmp_path / "r", env=env)
    one_line_error(rc, err, "no pretrained weights for resnet18", "--weights")


# --------------------------------------------------------------------------- defaults that fit the machine

def test_space_resources_are_fitted_to_the_machine(cifar_dir, tmp_path, capsys):
    """vgg16_full asks for 4 CPUs per trial; on a 2-core machine it runs with 2 and says so."""
    from tune_cifar.commands.search import SearchOptions, plan_search
    weights = tmp_path / "vgg16.pth"
    torch.save(torchvision.models.vgg16().state_dict(), weights)
    plan = plan_search("vgg16_full", SearchOptions(results_dir=tmp_path, weights=str(weights), quick=True,
                                                   data_dir=str(cifar_dir)))
    cores = os.cpu_count()
    assert plan.resources == {"cpu": float(min(4, cores)), "gpu": 0}
    if cores < 4:
        assert f"resources.cpu=4 of the search space is more than the {cores} CPU cores here" in capsys.readouterr().out


# --------------------------------------------------------------------------- installable like a library

@pytest.mark.slow
def test_the_wheel_works_from_another_folder(cifar_dir, tmp_path):
    dist, site, elsewhere = tmp_path / "dist", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", dist, ROOT], check=True,
                   capture_output=True)
    (wheel,) = dist.glob("tune_cifar-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", site, wheel], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site)}

    def run(*args):
        return subprocess.run([sys.executable, *map(str, args)], cwd=elsewhere, env=env, capture_output=True,
                              text=True, timeout=300)
    where = run("-c", "import tune_cifar, sys; print(tune_cifar.__file__)").stdout
    assert where.startswith(str(site)), where                 # the installed copy, not the source tree
    assert run("-m", "tune_cifar", "--help").returncode == 0
    p = run("-m", "tune_cifar", "train", "simple_cnn", "--epochs", 1, "--subset", 2000, "--data-dir", cifar_dir)
    assert p.returncode == 0, p.stderr
    metrics = json.loads((elsewhere / "results" / "train_simple_cnn_scratch" / "metrics.json").read_text())
    assert 0.1 < metrics["test_acc"] <= 1
