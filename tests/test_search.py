"""search and kfold end to end on real CIFAR-10 subsets, sharing one local Ray for the module:
ASHA stops trials, files are consistent, seeds reproduce, faults are contained, kill -9 resumes."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, TINY

pytestmark = pytest.mark.slow          # end-to-end runs: `pytest -m 'not slow'` leaves them out

OK = {"completed", "stopped", "early_stopped"}


def search_args(cifar_dir, results, name, *extra):
    return ("search", TINY, "--data-dir", cifar_dir, "--subset", 2000, "--results-dir", results, "--name", name,
            *extra)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return tmp_path_factory.mktemp("results")


@pytest.fixture(scope="module")
def first_search(ray_session, results, cifar_dir):
    from tune_cifar.cli import main
    assert main([str(a) for a in search_args(cifar_dir, results, "s1", "--seed", 1)]) == 0
    return results / "s1"


def is_png(path: Path) -> bool:
    data = path.read_bytes()
    if not data.startswith(b"\x89PNG\r\n\x1a\n") or len(data) < 2000:
        return False
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return 200 <= width <= 4000 and 150 <= height <= 4000


def test_search_writes_consistent_results(first_search):
    exp = first_search
    for f in ("spec.yaml", "trials.csv", "history.csv", "best.json", "best_model.pt", "optuna.db", "report.md"):
        assert (exp / f).is_file(), f
    trials = pd.read_csv(exp / "trials.csv", dtype={"trial_id": str})
    history = pd.read_csv(exp / "history.csv", dtype={"trial_id": str})
    assert len(trials) == 6 and set(trials["status"]) <= OK
    assert (trials["rounds"] < 4).any(), "ASHA stopped no trial early"
    assert {"lr", "optimizer", "batch_size", "best_val_acc", "last_val_acc", "epochs", "seconds"} <= set(trials.columns)
    for _, t in trials.iterrows():                       # history holds every reported round of every trial
        h = history[history["trial_id"] == t["trial_id"]]
        assert len(h) == t["rounds"] and h["round"].tolist() == list(range(1, t["rounds"] + 1))
        assert h["val_acc"].max() == pytest.approx(t["best_val_acc"])
        assert h["val_acc"].iloc[-1] == pytest.approx(t["last_val_acc"])
    best = json.loads((exp / "best.json").read_text())
    assert best["val_acc"] == trials["last_val_acc"].max()
    assert 0.1 < best["test_acc"] <= 1
    # precision: auto, resolved by each trial on its own CPU (bf16 where it computes bf16 natively)
    from tune_cifar.training.step import cpu_has_bf16
    assert set(trials["precision_used"]) == {"bf16" if cpu_has_bf16() else "fp32"} == {best["precision_used"]}
    saved = torch.load(exp / "best_model.pt", weights_only=True)
    assert saved["config"]["lr"] == pytest.approx(best["best_config"]["lr"])
    # the test accuracy in best.json is what the saved model scores on the test set
    from tune_cifar.core.config import TrainConfig
    from tune_cifar.data.cache import device_data
    from tune_cifar.results.export import load_trained
    from tune_cifar.training.evaluate import evaluate_test
    model, cfg, _ = load_trained(exp)
    test_acc = evaluate_test(model, cfg.replace(threads=None), device_data(cfg))["test_acc"]
    assert test_acc == pytest.approx(best["test_acc"])
    # the Optuna study in SQLite holds every trial (what optuna-dashboard opens)
    import optuna
    study = optuna.load_study(study_name="s1", storage=f"sqlite:///{exp / 'optuna.db'}")
    assert len(study.trials) == 6
    # ... and tells the truth: a trial ASHA stopped is PRUNED with its curve, a COMPLETE one ran every round
    State = optuna.trial.TrialState
    pruned = [t for t in study.trials if t.state == State.PRUNED]
    complete = [t for t in study.trials if t.state == State.COMPLETE]
    assert pruned and complete and len(pruned) + len(complete) == 6
    for t in pruned:
        steps = sorted(t.intermediate_values)
        assert 1 <= len(steps) < 4 and steps == list(range(1, len(steps) + 1))
    for t in complete:
        assert sorted(t.intermediate_values) == [1, 2, 3, 4]
        assert t.value == pytest.approx(t.intermediate_values[4])
    assert len(pruned) == (trials["status"] == "stopped").sum()
    assert len(complete) == (trials["status"] == "completed").sum()
    assert TrainConfig.from_dict(saved["config"]).model == "simple_cnn"


def test_report_images_and_numbers(first_search):
    exp = first_search
    for png in ("curves.png", "trials_epochs.png", "history.png", "parallel.png", "confusion.png", "per_class.png"):
        assert is_png(exp / png), png
    report = (exp / "report.md").read_text()
    assert "test accuracy" in report and "confusion.png" in report and "overfitting gap" in report
    pred = json.loads((exp / "test_predictions.json").read_text())
    from sklearn.metrics import f1_score
    per_class = pd.read_csv(exp / "per_class.csv")
    np.testing.assert_allclose(per_class["f1"], f1_score(pred["labels"], pred["predictions"], average=None), atol=1e-9)
    acc = np.mean(np.array(pred["labels"]) == np.array(pred["predictions"]))
    assert acc == pytest.approx(json.loads((exp / "best.json").read_text())["test_acc"])


def test_same_seed_same_configurations(first_search, results, cifar_dir, cli):
    rc, _, err = cli(*search_args(cifar_dir, results, "s2", "--seed", 1, "--num-samples", 3, "--max-epochs", 1,
                                  "--no-report"))
    assert rc == 0, err
    rc, _, err = cli(*search_args(cifar_dir, results, "s3", "--seed", 2, "--num-samples", 3, "--max-epochs", 1,
                                  "--no-report"))
    assert rc == 0, err
    cols = ["trial", "lr", "optimizer", "batch_size"]
    a = pd.read_csv(first_search / "trials.csv")[cols].head(3)
    b = pd.read_csv(results / "s2" / "trials.csv")[cols]
    c = pd.read_csv(results / "s3" / "trials.csv")[cols]
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))
    assert not np.allclose(b["lr"].iloc[1:], c["lr"].iloc[1:])   # trial 1 is the space's default point


def test_faulty_trials_are_contained(ray_session, results, cifar_dir, cli, monkeypatch):
    monkeypatch.setenv("TUNE_CIFAR_INJECT", json.dumps({"raise": {"2": 1}, "nan": {"3": 1}, "raise_once": {"4": 2},
                                                        "oom": {"6": 1}}))
    rc, out, err = cli(*search_args(cifar_dir, results, "faults", "--num-samples", 6, "--max-failures", 1,
                                    "--grace-period", 2, "--no-report"))
    assert rc == 0, err
    trials = pd.read_csv(results / "faults" / "trials.csv").set_index("trial")
    assert trials.loc[2, "status"] == "error" and "injected fault in trial 2" in trials.loc[2, "error"]
    assert trials.loc[3, "status"] == "diverged" and trials.loc[3, "last_val_acc"] == 0.0
    assert trials.loc[4, "status"] == "completed"              # retried from its checkpoint, then finished
    history = pd.read_csv(results / "faults" / "history.csv")
    assert history[history["trial_id"] == trials.loc[4, "trial_id"]]["round"].tolist() == [1, 2, 3, 4]
    assert trials.loc[6, "status"] == "oom" and "smaller batch size" in trials.loc[6, "error"]
    assert {1, 5} <= set(trials.index[trials["status"].isin(OK)])


def _wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the driver ended early:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.5)
    raise AssertionError("timed out waiting for the driver")


def _kill_midway(args, exp: Path, gcs: str, ready=None) -> None:
    """Start the CLI as its own driver on the module's Ray, SIGKILL it once `ready(exp)` (by default:
    once 2 trials have checkpoints)."""
    ready = ready or (lambda exp: len(list((exp / "tune").glob("trial_*/checkpoint_*"))) >= 2)
    proc = subprocess.Popen([sys.executable, "-m", "tune_cifar", *map(str, args), "--address", gcs], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: ready(exp), 240, proc)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (exp / "trials.csv").exists()


def _rounds_tune_saved(exp: Path) -> dict[str, int]:
    """Per trial, the round of the checkpoint Tune's experiment state named when the driver died
    (0: none yet). Rounds reported after that snapshot are Tune's to run again on resume."""
    from ray.tune import ExperimentAnalysis

    from tune_cifar.tuning.checkpoint_mend import named_round
    return {trial.trial_id: named_round(trial) for trial in ExperimentAnalysis(str(exp / "tune")).trials}


KFOLD_KILLED_ROUNDS = 4          # test_kfold_resumes_after_sigkill: 2 epochs x 2 evaluations


def _running_with_named_checkpoint(exp: Path) -> list:
    """The trials Tune's saved experiment state has as unfinished (it saves a running one as pending),
    with a checkpoint to restore from and rounds still to run."""
    from ray.tune import ExperimentAnalysis

    from tune_cifar.tuning.checkpoint_mend import named_round
    try:
        trials = ExperimentAnalysis(str(exp / "tune")).trials
    except Exception:      # no state written yet, or caught mid-write
        return []
    return [t for t in trials if t.status not in ("TERMINATED", "ERROR") and t.checkpoint is not None
            and named_round(t) < KFOLD_KILLED_ROUNDS]


def _lose_a_named_checkpoint(exp: Path) -> tuple[str, int]:
    """Leave what a driver killed at the worst moment leaves: the experiment state names a checkpoint of
    an unfinished trial (round k) that num_to_keep=1 has already replaced by the next one (round k+1,
    made here from round k's state with one more round in its history). Without checkpoint_mend, Ray's
    restore of that trial fails on every retry. Returns the trial and k + 1."""
    (trial, *_) = _running_with_named_checkpoint(exp)
    named = Path(trial.checkpoint.path)
    newer = named.with_name(f"checkpoint_{int(named.name.split('_')[1]) + 1:06d}")
    state = torch.load(named / "state.pt", weights_only=False)
    extra = dict(state["history"][-1], round=state["round"] + 1, epoch=(state["round"] + 1) / 2)
    state.update(history=[*state["history"], extra], round=extra["round"])
    shutil.rmtree(newer, ignore_errors=True)      # one the dead driver had not yet recorded
    newer.mkdir()
    torch.save(state, newer / "state.pt")
    shutil.copy(named / "trial.json", newer / "trial.json")
    shutil.rmtree(named)
    return trial.trial_id, extra["round"]


def _assert_saved_rounds_not_rerun(exp: Path, saved: dict[str, int]) -> None:
    for trial_id, rounds in saved.items():
        if not rounds:
            continue
        (trial_dir,) = (exp / "tune").glob(f"trial_*_{trial_id}")
        progress = pd.read_csv(trial_dir / "progress.csv")
        assert (progress["training_iteration"] == progress["round"]).all()    # Ray counts our rounds
        ran = progress["training_iteration"]
        assert sorted(ran[ran <= rounds]) == list(range(1, rounds + 1)), (trial_id, rounds, ran.tolist())


def test_search_resumes_after_sigkill(ray_session, results, cifar_dir, cli):
    args = search_args(cifar_dir, results, "killed", "--num-samples", 6, "--no-report")
    _kill_midway(args, results / "killed", ray_session)
    saved = _rounds_tune_saved(results / "killed")
    rc, _, err = cli(*args)
    assert rc == 2 and "--resume" in err                       # neither --resume nor --overwrite: refused
    rc, out, err = cli(*args, "--resume")
    assert rc == 0, err
    trials = pd.read_csv(results / "killed" / "trials.csv")
    assert len(trials) == 6 and set(trials["status"]) <= OK
    history = pd.read_csv(results / "killed" / "history.csv")
    _assert_saved_rounds_not_rerun(results / "killed", saved)     # no saved round was run again
    assert not history.duplicated(["trial_id", "round"]).any()     # each round once, from the run that counts
    assert json.loads((results / "killed" / "best.json").read_text())["test_acc"] > 0.1


def kfold_args(cifar_dir, results, name, *extra):
    return ("kfold", TINY, "--k", 3, "--data-dir", cifar_dir, "--subset", 1500, "--epochs", 1,
            "--results-dir", results, "--name", name, *extra)


def test_kfold_statistics(ray_session, results, cifar_dir, cli):
    rc, out, err = cli(*kfold_args(cifar_dir, results, "kf", "--num-samples", 2))
    assert rc == 0, err
    table = pd.read_csv(results / "kf" / "kfold.csv")
    folds = pd.read_csv(results / "kf" / "kfold_folds.csv")
    assert len(table) == 2 and len(folds) == 6 and set(folds["status"]) == {"completed"}
    for _, row in table.iterrows():
        accs = folds[folds["config"] == row["config"]].sort_values("fold")["accuracy"].to_numpy()
        assert row["mean_acc"] == pytest.approx(accs.mean())
        assert row["std_acc"] == pytest.approx(np.std(accs, ddof=1))
        assert [row[f"fold_{i}"] for i in range(3)] == pytest.approx(accs.tolist())
    assert is_png(results / "kf" / "kfold.png")
    assert "mean_acc" in out


def test_kfold_from_search_and_explicit_set(first_search, results, cifar_dir, cli):
    rc, _, err = cli(*kfold_args(cifar_dir, results, "kf_top", "--from-search", "s1", "--top", 2, "--no-report"))
    assert rc == 0, err
    table = pd.read_csv(results / "kf_top" / "kfold.csv")
    best = pd.read_csv(first_search / "trials.csv").sort_values("last_val_acc", ascending=False).head(2)
    assert sorted(table["lr"]) == pytest.approx(sorted(best["lr"]))
    rc, _, err = cli(*kfold_args(cifar_dir, results, "kf_set", "--set", "lr=0.02", "--set", "optimizer=adam",
                                 "--no-report"))
    assert rc == 0, err
    table = pd.read_csv(results / "kf_set" / "kfold.csv")
    assert len(table) == 1 and table["lr"].iloc[0] == 0.02 and table["optimizer"].iloc[0] == "adam"


def test_kfold_resumes_after_sigkill(ray_session, results, cifar_dir, cli):
    args = kfold_args(cifar_dir, results, "kf_killed", "--num-samples", 2, "--no-report",
                      "--epochs", KFOLD_KILLED_ROUNDS // 2)
    _kill_midway(args, results / "kf_killed", ray_session, ready=_running_with_named_checkpoint)
    saved = _rounds_tune_saved(results / "kf_killed")
    lost, newer_round = _lose_a_named_checkpoint(results / "kf_killed")
    rc, _, err = cli(*args, "--resume")
    assert rc == 0, err
    assert f"trial {lost}'s saved state named a checkpoint replaced" in err
    _assert_saved_rounds_not_rerun(results / "kf_killed", saved)
    # the round the mended checkpoint held beyond Ray's record was told to Ray, and the trial ran on
    (trial_dir,) = (results / "kf_killed" / "tune").glob(f"trial_*_{lost}")
    rounds = pd.read_json(trial_dir / "result.json", lines=True)["round"]
    assert newer_round in set(rounds) and rounds.max() == KFOLD_KILLED_ROUNDS
    folds = pd.read_csv(results / "kf_killed" / "kfold_folds.csv")
    assert len(folds) == 6 and set(folds["status"]) == {"completed"}
    assert not folds.duplicated(["config", "fold"]).any()


@pytest.mark.parametrize("fmt", ["pt", "pt2", "torchscript", "onnx"])
def test_export_gives_the_same_predictions(first_search, cifar, fmt, cli):
    rc, out, err = cli("export", str(first_search), "--format", fmt)
    assert rc == 0, err
    path = Path(out.strip().splitlines()[-1])
    meta = json.loads(path.with_name(path.name + ".json").read_text())
    assert meta["resolution"] == 32 and len(meta["classes"]) == 10
    from tune_cifar.data.store import to_model_input
    from tune_cifar.results.export import load_trained
    model, _, _ = load_trained(first_search)
    x = to_model_input(torch.from_numpy(cifar.test_x[:256]), meta["resolution"])
    with torch.no_grad():
        expected = model(x).argmax(1).numpy()
    if fmt == "pt":          # the final model's record: its networks' state dicts, config, kind and TTA
        from tune_cifar.training.final import FinalModel
        saved = torch.load(path, weights_only=True)
        assert saved["final"]["kind"] == "best_trial" and saved["final"]["tta"] == meta["final"]["tta"]
        got = FinalModel.from_record(saved, str(path)).predictor()(x).argmax(1).detach().numpy()
    elif fmt == "pt2":
        got = torch.export.load(str(path)).module()(x).argmax(1).detach().numpy()
    elif fmt == "torchscript":
        got = torch.jit.load(str(path))(x).argmax(1).detach().numpy()
    else:
        import onnxruntime
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {"image": x.numpy()})[0].argmax(1)
    np.testing.assert_array_equal(got, expected)


def test_compare_gathers_the_modes(first_search, results, cli):
    rc, out, err = cli("compare", "simple_cnn", "--results-dir", results)
    assert rc == 0, err
    table = pd.read_csv(results / "compare_simple_cnn" / "compare.csv")
    assert table.set_index("mode").loc["scratch", "test_acc"] > 0.1
    assert is_png(results / "compare_simple_cnn" / "compare.png")


@pytest.mark.parametrize("searcher", ["tpe", "random"])
def test_time_budget_stops_the_search_and_keeps_the_results(searcher, ray_session, results, cifar_dir, cli):
    name = f"budget_{searcher}"
    rc, out, err = cli(*search_args(cifar_dir, results, name, "--num-samples", 200, "--time-budget", 45,
                                    "--searcher", searcher, "--no-report"))
    assert rc == 0, err
    best = json.loads((results / name / "best.json").read_text())
    trials = pd.read_csv(results / name / "trials.csv")
    assert len(trials) < 200                                   # the budget, not num_samples, ended it
    # at most one trial per CPU plus one was waiting when the clock ended: no queue of never-run trials
    import ray
    assert (trials["status"] == "not_run").sum() <= int(ray.cluster_resources()["CPU"]) + 1, trials["status"]
    assert {"validate", "search", "test"} <= set(best["phases"]) and "of a 45s budget" in out
    assert best["wall_s"] > 0                                  # how close it keeps to the budget: bench cpu_budget
    assert (results / name / "best_model.pt").is_file() and best["test_acc"] > 0.1


def test_kfold_draws_spread_over_the_space():
    """--num-samples: the default point, then Sobol points that cover each range (the learning rate's
    low and high ends too), the same for the same seed."""
    import math

    from tune_cifar.commands.kfold import draw_configs
    from tune_cifar.core.spaces import load_space
    spec = load_space("simple_cnn")
    draws = draw_configs(spec, 8, seed=0)
    assert draws[0] == spec.default_point() and len(draws) == 8
    assert draws == draw_configs(spec, 8, seed=0) and draws != draw_configs(spec, 8, seed=1)
    low, high = (math.log(v) for v in spec.space["lr"].values)
    position = sorted((math.log(d["lr"]) - low) / (high - low) for d in draws[1:])
    # 7 Sobol points over [0, 1): one in each quarter at least, and no two in the same eighth
    assert all(any(q / 4 <= p < (q + 1) / 4 for p in position) for q in range(4)), position
    assert len({int(p * 8) for p in position}) == 7, position
    assert {d["optimizer"] for d in draws[1:]} == {"sgd", "adam", "adamw"}
