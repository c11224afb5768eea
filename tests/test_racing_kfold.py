"""Racing kfold end to end on real CIFAR-10 (K = 4, 3 configurations): a hopeless configuration is
dropped after split 3, fewer fold trainings run than K x configurations, the winner runs every split,
and a driver killed -9 after the first decision (split 4 handed out) resumes where it was."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import ROOT, TINY

K, CANDIDATES = 4, 3


@pytest.fixture(scope="module")
def space(tmp_path_factory) -> Path:
    """The tiny test space with a learning-rate range reaching far below anything that learns in one
    epoch: kfold's Sobol draws put some candidates there, and those stay at chance on every split."""
    doc = yaml.safe_load(open(TINY))
    doc["space"] = {"lr": {"loguniform": [1.0e-7, 0.1]}}
    doc["default"] = {"lr": 0.05}
    doc["fixed"] = {**doc["fixed"], "optimizer": "sgd", "batch_size": 32}     # many steps on few images
    path = tmp_path_factory.mktemp("space") / "race_space.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def kfold_args(space, cifar_dir, results, name):
    return ["kfold", space, "--k", K, "--num-samples", CANDIDATES, "--subset", 1200, "--epochs", 2,
            "--data-dir", cifar_dir, "--results-dir", results, "--name", name, "--no-report"]


def split_handed_out(exp: Path, split: int) -> bool:
    """Whether Tune's saved experiment state holds a trial of `split` (0-based)."""
    from ray.tune import ExperimentAnalysis
    try:
        trials = ExperimentAnalysis(str(exp / "tune")).trials
    except Exception:      # no state written yet, or caught mid-write
        return False
    return any(int(t.config["_fold_index"]) == split for t in trials)


def kill_when(args, ready, gcs: str, timeout: float = 900) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "tune_cifar", *map(str, args), "--address", gcs], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + timeout
        while not ready():
            assert proc.poll() is None, f"the driver ended early:\n{proc.stdout.read()[-3000:]}"
            assert time.time() < deadline, "timed out waiting for the driver"
            time.sleep(0.5)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_racing_drops_a_hopeless_configuration_and_resumes_after_sigkill(space, ray_session, tmp_path, cifar_dir,
                                                                         cli):
    from tune_cifar.commands.kfold import draw_configs
    from tune_cifar.core.spaces import load_space
    drawn = draw_configs(load_space(str(space)), CANDIDATES, 0)
    assert drawn[0]["lr"] == 0.05 and min(c["lr"] for c in drawn) < 1e-4      # the premise: a hopeless draw

    exp = tmp_path / "race"
    args = kfold_args(space, cifar_dir, tmp_path, "race")
    kill_when(args, lambda: split_handed_out(exp, 3), ray_session)       # killed after the decision at split 3
    assert not (exp / "kfold.csv").exists()
    rc, out, err = cli(*args, "--resume")
    assert rc == 0, err

    plan = json.loads((exp / "plan.json").read_text())
    assert plan["race"] == {"on": True, "min_splits": 3, "alpha": 0.05}
    table = pd.read_csv(exp / "kfold.csv")
    folds = pd.read_csv(exp / "kfold_folds.csv")
    summary = json.loads((exp / "kfold_summary.json").read_text())
    dropped = table[table["dropped_after"].notna()]
    assert len(dropped) >= 1 and (dropped["dropped_after"] >= 3).all()
    assert (dropped["splits_done"] == dropped["dropped_after"]).all()         # no split after its drop
    assert all(drawn[i]["lr"] < 1e-3 for i in dropped["config"])       # only learning rates that cannot learn
    winner = table.iloc[0]
    assert pd.isna(winner["dropped_after"]) and winner["splits_done"] == K and winner["folds_ok"] == K
    assert summary["fold_trainings_full"] == K * CANDIDATES
    assert summary["fold_trainings"] == len(folds) == table["splits_done"].sum() < K * CANDIDATES
    assert not folds.duplicated(["config", "fold"]).any()                     # the kill repeated no split
    assert set(folds["status"]) == {"completed"}
    for _, row in dropped.iterrows():      # a dropped configuration keeps its interval and its test
        assert row["ci_low"] < row["mean_acc"] < row["ci_high"] and row["p_holm"] < 0.05
    assert f"fold trainings: {summary['fold_trainings']} of {K * CANDIDATES}" in out
