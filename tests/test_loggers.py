"""One tiny real search with --mlflow, run as a user runs it (a subprocess, stdout not a terminal):
what it prints, the TensorBoard event files read back with TensorBoard's own reader, the MLflow runs
read back with MlflowClient; and --mlflow without the package is a one-line error."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY, run_cli

pytestmark = pytest.mark.slow          # end-to-end runs: `pytest -m 'not slow'` leaves them out

SEARCHED = {"lr", "optimizer", "batch_size"}
CURVES = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, cifar_dir):
    results = tmp_path_factory.mktemp("results")
    rc, out, err = run_cli("search", TINY, "--data-dir", cifar_dir, "--subset", 2000, "--num-samples", 3,
                           "--max-epochs", 1, "--results-dir", results, "--name", "logs", "--mlflow")
    assert rc == 0, err[-3000:]
    exp = results / "logs"
    trials = pd.read_csv(exp / "trials.csv", dtype={"trial_id": str})
    history = pd.read_csv(exp / "history.csv", dtype={"trial_id": str})
    return exp, out, err, trials, history


def test_output_is_one_line_per_trial(tiny):
    exp, out, err, trials, _ = tiny
    lines = out.splitlines()
    finished = [ln for ln in lines if ln.startswith("trial ")]
    assert len(finished) == len(trials) == 3
    for ln in finished:
        assert "lr=" in ln and "optimizer=" in ln and "batch_size=" in ln and "val_acc" in ln
        assert ln.split("  ")[1] in ("completed", "stopped by ASHA")
    assert lines[0] == f"search logs: results in {exp}; tensorboard --logdir {exp}; MLflow: " \
                       f"sqlite:///{exp.resolve() / 'mlruns' / 'mlflow.db'}"
    assert len(lines) < 25, out
    for noise in ("Checkpoint successfully created", "Trial status", "Configuration for experiment", "╭",
                  "Current best trial", "Token authentication", "snapshotting", "A new study created"):
        assert noise not in out + err, noise


def test_tensorboard_curves_and_hparams_per_trial(tiny):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    exp, _, _, trials, history = tiny
    for _, t in trials.iterrows():
        trial_dir = next((exp / "tune").glob(f"trial_{t['trial']}_*"))
        acc = EventAccumulator(str(trial_dir))
        acc.Reload()
        h = history[history["trial_id"] == t["trial_id"]]
        assert set(acc.Tags()["scalars"]) == {f"ray/tune/{k}" for k in (*CURVES, "epoch")}
        for key in CURVES:
            events = acc.Scalars(f"ray/tune/{key}")
            assert [e.step for e in events] == list(range(1, t["rounds"] + 1))        # one point per round
            assert [e.value for e in events] == pytest.approx(h[key].tolist(), rel=1e-5)
        plugin = acc.PluginTagToContent("hparams")
        experiment = plugin_data_pb2.HParamsPluginData.FromString(plugin["_hparams_/experiment"]).experiment
        assert {i.name for i in experiment.hparam_infos} == SEARCHED      # the searched keys, no constant
        assert "ray/tune/val_acc" in {m.name.tag for m in experiment.metric_infos}
        start = plugin_data_pb2.HParamsPluginData.FromString(plugin["_hparams_/session_start_info"])
        values = start.session_start_info.hparams
        assert values["optimizer"].string_value == t["optimizer"]
        assert values["lr"].number_value == pytest.approx(t["lr"])
        assert values["batch_size"].number_value == t["batch_size"]


def test_mlflow_parent_and_child_runs(tiny):
    from mlflow.tracking import MlflowClient

    exp, _, _, trials, history = tiny
    client = MlflowClient(f"sqlite:///{exp / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("logs")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.params["model"] == "simple_cnn"
    best = json.loads((exp / "best.json").read_text())
    assert parent.data.metrics["test_acc"] == pytest.approx(best["test_acc"])
    assert {"best.json", "report.md", "best_model.pt"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    children = {r.data.tags["mlflow.runName"]: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert len(children) == len(trials) == 3
    for _, t in trials.iterrows():
        run = children[f"trial_{t['trial']}"]
        assert run.info.status == "FINISHED"
        assert set(run.data.params) == SEARCHED
        assert float(run.data.params["lr"]) == pytest.approx(t["lr"]) and run.data.params["optimizer"] == t["optimizer"]
        assert run.data.tags["status"] == {"completed": "completed", "stopped": "stopped by ASHA"}[t["status"]]
        h = history[history["trial_id"] == t["trial_id"]]
        val = client.get_metric_history(run.info.run_id, "val_acc")
        assert sorted(m.step for m in val) == list(range(1, t["rounds"] + 1))
        assert [m.value for m in sorted(val, key=lambda m: m.step)] == pytest.approx(h["val_acc"].tolist())


def test_mlflow_missing_is_one_line_and_writes_nothing(tmp_path, cifar_dir):
    # mlflow made unimportable in a child process: the check runs before the folder is made or Ray starts
    code = ("import sys; sys.modules['mlflow'] = None; from tune_cifar.cli import main; "
            f"sys.exit(main(['search', {TINY!r}, '--data-dir', {str(cifar_dir)!r}, '--subset', '2000', "
            f"'--results-dir', {str(tmp_path)!r}, '--mlflow']))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == ["tune_cifar search: error: --mlflow needs MLflow: "
                                             "pip install 'tune_cifar[mlflow]' (or mlflow)"]
    assert list(Path(tmp_path).iterdir()) == []


def test_flags_reach_the_options():
    from tune_cifar.cli import build_parser, options
    from tune_cifar.commands.kfold import KFoldOptions
    from tune_cifar.commands.search import SearchOptions
    a = build_parser().parse_args(["search", "x", "--no-tensorboard", "--mlflow", "http://h:5000", "--verbose"])
    o = options(SearchOptions, a)
    assert (o.tensorboard, o.mlflow, o.verbose) == (False, "http://h:5000", True)
    o = options(KFoldOptions, build_parser().parse_args(["kfold", "x", "--mlflow"]))
    assert (o.tensorboard, o.mlflow, o.verbose) == (True, "", False)
