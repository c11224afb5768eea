"""The live view on Tune's own Trial objects (stubs, no Ray started): statuses in words, the table that
fits a terminal, one line per finished trial elsewhere, kfold's configuration x fold rows; and that
quiet_ray puts back what it changed. A real search's output is checked in test_loggers.py."""
from __future__ import annotations

import io
import logging
import os
import re
import time

import pytest
from ray.tune.experiment import Trial
from rich.console import Console

from tune_cifar.tuning.live_view import LiveView, quiet_ray, trial_status

PARAMS = ["lr", "optimizer", "batch_size"]


def make_trial(n: int, status: str, val_accs=(), own_status: str | None = None, epochs: int = 2, **config):
    """A Tune Trial as the controller leaves it: `val_accs` one per reported round (2 rounds an epoch)."""
    cfg = {"epochs": epochs, "evals_per_epoch": 2, "lr": 0.01 * n, "optimizer": "sgd", "batch_size": 64, **config}
    t = Trial("run_trial", config=cfg, experiment_tag=f"{n}_lr={cfg['lr']}", stub=True)
    if val_accs:
        t.set_status(Trial.RUNNING)
    for i, acc in enumerate(val_accs, 1):
        t.update_last_result({"training_iteration": i, "epoch": i / 2, "val_acc": acc, "time_total_s": 2.0 * i,
                              "status": own_status if i == len(val_accs) and own_status else "running"})
    t.set_status(status)
    return t


def screen(out: io.StringIO) -> list[str]:
    """What a terminal showed, as lines (the live display's cursor moves and redraws stripped)."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "", out.getvalue()).splitlines()


def view(kind="search", live=True, width=140, height=40, params=PARAMS, budget=None):
    out = io.StringIO()
    console = Console(file=out, width=width, height=height, force_terminal=live, color_system=None)
    v = LiveView("exp", kind, params, started=time.time() - 75, time_budget=budget, live=live, console=console)
    v.setup(total_num_samples=6)
    return v, out


@pytest.fixture
def trials():
    return [make_trial(1, Trial.TERMINATED, [0.2, 0.3, 0.35, 0.4]),       # all 4 rounds
            make_trial(2, Trial.TERMINATED, [0.1]),                       # ASHA after round 1
            make_trial(3, Trial.TERMINATED, [0.0], own_status="diverged"),
            make_trial(4, Trial.TERMINATED, [0.0], own_status="oom"),
            make_trial(5, Trial.ERROR, [0.15, 0.16]),
            make_trial(6, Trial.RUNNING, [0.25, 0.3]),
            make_trial(7, Trial.PENDING)]


def test_statuses_in_words(trials):
    assert [trial_status(t) for t in trials] == ["completed", "stopped by ASHA", "diverged", "oom", "error",
                                                 "running", "pending"]
    assert trial_status(trials[1], ended_by_clock=True) == "stopped (time budget)"
    assert trial_status(make_trial(8, Trial.TERMINATED)) == "not run"
    # on_trial_complete comes before Tune marks the trial TERMINATED
    assert trial_status(make_trial(9, Trial.RUNNING, [0.1, 0.2]), ending=True) == "stopped by ASHA"


def test_table_shows_searched_keys_epochs_and_accuracies(trials):
    v, out = view(budget=600)
    v.on_step_end(iteration=1, trials=trials)
    lines = screen(out)
    v.close()
    text = "\n".join(lines)
    header = next(line for line in lines if line.startswith("search exp:"))
    assert "5 done, 1 running, 1 pending" in header and "best val_acc 0.4000 (trial 1)" in header
    assert "1:15 elapsed" in header and "8:45 left of 10:00" in header
    rows = {line.split()[0]: line for line in lines if line[:1].isdigit()}
    assert set(rows) == {str(n) for n in range(1, 8)}
    assert "stopped by ASHA" in rows["2"] and "0.5/2" in rows["2"] and "0.1000" in rows["2"]
    assert rows["1"].split()[1:] == ["completed", "0.01", "sgd", "64", "2/2", "0.4000", "0.4000", "8s"]
    assert "0.1600" in rows["5"] and "error" in rows["5"]
    # searched keys only: no constant of the config (epochs, evals_per_epoch) is a column
    assert "evals_per_epoch" not in text and "epochs" not in text


def test_redraws_at_most_every_few_seconds(trials):
    v, out = view()
    v.on_step_end(iteration=1, trials=trials)
    drawn = out.getvalue()
    for i in range(50):
        v.on_step_end(iteration=2 + i, trials=trials)
    assert out.getvalue() == drawn
    v.close()


def test_table_fits_the_terminal():
    many = [make_trial(n, Trial.TERMINATED, [n / 100]) for n in range(1, 60)] + [make_trial(60, Trial.RUNNING, [0.01])]
    v, out = view(height=20)
    v.on_step_end(iteration=1, trials=many)
    lines = screen(out)
    v.close()
    assert len([ln for ln in lines if ln[:1].isdigit() and "not shown" not in ln]) <= 20 - 7
    assert any(ln.startswith("60 ") and "running" in ln for ln in lines)            # running first
    assert any(ln.startswith("59 ") for ln in lines) and not any(ln.startswith("1 ") for ln in lines)
    assert any("more trials not shown" in ln for ln in lines)


def test_not_a_terminal_one_line_per_finished_trial(trials, capsys):
    v, _ = view(live=False)
    running = [make_trial(1, Trial.RUNNING, [0.2]), make_trial(2, Trial.PENDING)]
    for i in range(5):
        v.on_step_end(iteration=i, trials=running)          # rounds: nothing printed
    assert capsys.readouterr().out == ""
    v.on_step_end(iteration=9, trials=trials)
    v.on_step_end(iteration=10, trials=trials)              # each finished trial once
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5
    assert lines[0].startswith("trial 1  completed  lr=0.01 optimizer=sgd batch_size=64  epoch 2/2")
    assert "val_acc 0.4000 (best 0.4000)" in lines[0]
    assert lines[1].startswith("trial 2  stopped by ASHA") and lines[4].startswith("trial 5  error")
    v.on_experiment_end(trials=trials)
    assert capsys.readouterr().out.startswith("search exp: 5 of 6 done, 1 running, 1 pending")


def test_kfold_rows_are_configuration_by_fold():
    candidates = [{"lr": 0.05, "optimizer": "sgd"}, {"lr": 0.2, "optimizer": "adam"}]
    ts = [make_trial(1 + c * 2 + f, Trial.TERMINATED, [0.3 + c / 10 + f / 100] * 4, _candidates=candidates,
                     _candidate=c, _fold_index=f) for c in range(2) for f in range(2)]
    v, out = view(kind="kfold", params=["lr", "optimizer"])
    v.on_step_end(iteration=1, trials=ts)
    lines = screen(out)
    v.close()
    text = "\n".join(lines)
    assert "best config 1: mean val_acc 0.4050 over 2 folds" in text
    rows = [line.split() for line in lines if line.strip()[:1].isdigit()]
    assert [r[:5] for r in rows] == [["0", "0", "completed", "0.05", "sgd"], ["0", "1", "completed", "0.05", "sgd"],
                                     ["1", "0", "completed", "0.2", "adam"], ["1", "1", "completed", "0.2", "adam"]]


def test_quiet_ray_restores_levels_and_environment():
    before = {n: logging.getLogger(n).level for n in ("ray.tune", "ray._private", "mlflow")}
    env = os.environ.get("RAY_AIR_NEW_OUTPUT")
    with quiet_ray(verbose=False):
        assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"
        assert logging.getLogger("ray.tune").level == logging.ERROR
    assert {n: logging.getLogger(n).level for n in before} == before
    assert os.environ.get("RAY_AIR_NEW_OUTPUT") == env
    with quiet_ray(verbose=True):
        assert os.environ.get("RAY_AIR_NEW_OUTPUT") == env
