"""The report's search plots show every trial that reported a round, pruned ones at the rung they
reached, and say why where a plot could say nothing; curves.png shows one-round trials.

The figures are read back through their matplotlib artists (scatter offsets, the parallel
coordinates' line collection, the importance bars), not through the PNGs."""
from __future__ import annotations

import math

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import optuna
import pandas as pd
import pytest
from conftest import TINY, run_cli
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from tune_cifar.results import report
from tune_cifar.results.search_plots import RUNG_PARAM, importance_picture, reached_trials, search_pictures

SPACE = {"lr": FloatDistribution(1e-3, 0.3, log=True), "optimizer": CategoricalDistribution(("sgd", "adam")),
         "batch_size": CategoricalDistribution((64, 128))}
EPOCHS_AT = {1: 0.5, 2: 1.0, 3: 1.5, 4: 2.0}

# (state, curve: val_acc per round, params); an ASHA search of max_t=4, rungs at rounds 1 and 3
TRIALS = [
    (TrialState.COMPLETE, [0.20, 0.30, 0.42, 0.45], {"lr": 0.05, "optimizer": "sgd", "batch_size": 64}),
    (TrialState.PRUNED, [0.12], {"lr": 0.2, "optimizer": "adam", "batch_size": 128}),
    (TrialState.PRUNED, [0.22, 0.25, 0.31], {"lr": 0.01, "optimizer": "adam", "batch_size": 64}),
    (TrialState.PRUNED, [0.15], {"lr": 0.002, "optimizer": "sgd", "batch_size": 128}),
    (TrialState.FAIL, [], {"lr": 0.1, "optimizer": "sgd", "batch_size": 64}),     # crashed before a round
    (TrialState.PRUNED, [0.18, 0.2, 0.27], {"lr": 0.03, "optimizer": "sgd", "batch_size": 128}),
    (TrialState.PRUNED, [0.10], {"lr": 0.25, "optimizer": "adam", "batch_size": 64}),
    (TrialState.COMPLETE, [0.21, 0.33, 0.40, 0.43], {"lr": 0.02, "optimizer": "adam", "batch_size": 128}),
]


def write_study(exp, trials) -> optuna.Study:
    """A study in exp/optuna.db written the way the searcher writes it: every round an intermediate
    value, a stopped trial told PRUNED (Optuna gives it its last intermediate value)."""
    exp.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name=exp.name, storage=f"sqlite:///{exp / 'optuna.db'}", direction="maximize")
    for state, curve, params in trials:
        study.enqueue_trial(params)
        trial = study.ask(fixed_distributions=SPACE)
        for step, v in enumerate(curve, start=1):
            trial.report(v, step)
        study.tell(trial, curve[-1] if state == TrialState.COMPLETE else None, state=state)
    return study


def expected(trials) -> dict[int, tuple[int, float]]:
    """trial number -> (round reached, its value) for every trial that reported a round."""
    return {n: (len(curve), curve[-1]) for n, (_, curve, _) in enumerate(trials) if curve}


def history_points(ax) -> dict[int, tuple[str, float]]:
    """trial number -> (legend label of its series, value) of the points Optuna scattered."""
    points = {}
    for coll in ax.collections:
        for x, y in np.asarray(coll.get_offsets()):
            assert int(x) not in points, f"trial {x} drawn twice"
            points[int(x)] = (coll.get_label(), float(y))
    return points


@pytest.fixture()
def study(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return write_study(tmp_path / "exp", TRIALS)


def test_the_study_is_as_asha_leaves_it(study):
    states = [t.state for t in study.trials]
    assert states.count(TrialState.PRUNED) == 5 and states.count(TrialState.COMPLETE) == 2
    # what the plots had before: Optuna's own history reads only the two COMPLETE trials
    with matplotlib.rc_context(), pytest.warns(optuna.exceptions.ExperimentalWarning):
        ax = optuna.visualization.matplotlib.plot_optimization_history(study)
    assert sum(len(c.get_offsets()) for c in ax.collections) == 2
    plt.close("all")


def test_history_shows_every_trial_at_its_rung(study):
    history, _, _ = search_pictures(study, "val_acc", EPOCHS_AT)
    want = expected(TRIALS)
    got = history_points(history.ax)
    assert set(got) == set(want)                       # all 7 trials that reported a round, not the FAIL one
    for n, (step, value) in want.items():
        label, y = got[n]
        assert y == pytest.approx(value)
        assert f"round {step} (epoch {EPOCHS_AT[step]:g})" in label     # the colour's legend names the rung
    assert "round reached" in history.ax.get_title()
    assert "2 at round 1" not in history.caption and "3 at round 1 (epoch 0.5)" in history.caption
    plt.close("all")


def test_parallel_coordinates_draw_every_trial_with_its_rung_axis(study):
    _, parallel, _ = search_pictures(study, "val_acc", EPOCHS_AT)
    ax = parallel.ax
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[0] == "val_acc" and RUNG_PARAM in labels and {"lr", "optimizer", "batch_size"} <= set(labels)
    (lines,) = [c for c in ax.collections if len(c.get_segments())]
    segments = lines.get_segments()
    want = expected(TRIALS)
    assert len(segments) == len(want)
    # first vertex: the trial's value (Optuna's objective axis); the rung axis: its round, in order
    by_value = {round(float(s[0][1]), 6): s for s in segments}
    assert sorted(by_value) == sorted(round(v, 6) for _, v in want.values())
    rung_x = labels.index(RUNG_PARAM)
    rung_y = {step: set() for step, _ in want.values()}
    for step, value in want.values():
        rung_y[step].add(round(float(by_value[round(value, 6)][rung_x][1]), 9))
    assert all(len(ys) == 1 for ys in rung_y.values())             # one height per round
    heights = [rung_y[s].pop() for s in sorted(rung_y)]
    assert heights == sorted(heights) and len(set(heights)) == 3
    plt.close("all")


def test_importance_is_taken_at_the_round_every_trial_reached(study):
    _, _, importance = search_pictures(study, "val_acc", EPOCHS_AT)
    ax = importance.ax
    bars = {t.get_text(): p.get_width() for t, p in zip(ax.get_yticklabels(), ax.patches)}
    assert set(bars) == {"lr", "optimizer", "batch_size"}
    # the same numbers from a study of every trial's value at round 1 (ASHA's first rung)
    at_round_1 = optuna.create_study(direction="maximize")
    at_round_1.add_trials(optuna.trial.create_trial(value=curve[0], params=params, distributions=SPACE)
                          for _, curve, params in TRIALS if curve)
    want = optuna.importance.get_param_importances(
        at_round_1, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), params=sorted(SPACE))
    assert bars == pytest.approx(want)
    assert "round 1 (epoch 0.5), the last round all 7 trials reached" in importance.caption
    plt.close("all")


def test_report_writes_the_pictures_with_captions(study, tmp_path):
    style = plt.rcParams["axes.facecolor"]
    images, notes, captions = report.optuna_plots(tmp_path / "exp", EPOCHS_AT)
    assert sorted(images.values()) == ["history.png", "importance.png", "parallel.png"] and not notes
    assert [t.split(" (")[0] for t in images] == ["Optimisation history", "Parallel coordinates",
                                                  "Hyper-parameter importance"]
    assert all((tmp_path / "exp" / png).stat().st_size > 2000 for png in images.values())
    assert all("round" in captions[t] for t in images)
    assert plt.get_fignums() == []
    assert plt.rcParams["axes.facecolor"] == style            # Optuna's ggplot style stayed in its plots


def test_what_cannot_be_said_is_said_not_drawn(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # one trial reported a round: no history, no lines to compare, no importance
    write_study(tmp_path / "one", TRIALS[:1] + TRIALS[4:5])
    images, _, captions = report.optuna_plots(tmp_path / "one", EPOCHS_AT)
    assert len(images) == 3 and set(images.values()) == {None}             # three sections, no picture
    assert all("not drawn" in c and "1 trial(s) reported a round" in c for c in captions.values())
    assert not list((tmp_path / "one").glob("*.png"))
    # four trials for three varied parameters: fewer than two per parameter
    write_study(tmp_path / "four", TRIALS[:4])
    images, _, captions = report.optuna_plots(tmp_path / "four", EPOCHS_AT)
    assert [png for png in images.values()] == ["history.png", "parallel.png", None]
    assert list(captions.values())[2] == (
        "hyper-parameter importance not drawn: 4 trial(s) for 3 varied parameters (batch_size, lr, optimizer); "
        "an importance needs at least 2 trials per parameter.")
    # a parameter that never varied is named, and left out of the importance (no 0.33 each)
    same_optimizer = [(s, c, {**p, "optimizer": "sgd"}) for s, c, p in TRIALS]
    study = write_study(tmp_path / "fixed", same_optimizer)
    pic = importance_picture(study, reached_trials(study), "val_acc", EPOCHS_AT)
    assert {t.get_text() for t in pic.ax.get_yticklabels()} == {"lr", "batch_size"}
    assert "Not varied (importance 0 by definition): optimizer" in pic.caption
    # every trial scored the same at the common round: nothing to explain
    flat = [(s, [0.1] + c[1:], p) for s, c, p in TRIALS if c]
    study = write_study(tmp_path / "flat", flat)
    pic = importance_picture(study, reached_trials(study), "val_acc", EPOCHS_AT)
    assert pic.ax is None and "every trial scored val_acc=0.1 at round 1" in pic.note
    plt.close("all")


def history_csv(trials) -> pd.DataFrame:
    rows = []
    for n, (_, curve, _) in enumerate(trials):
        for step, v in enumerate(curve, start=1):
            first_loss = 38.0 if n == 6 else 2.3                    # trial 6: far worse than guessing
            rows.append({"trial_id": f"t{n}", "training_iteration": step, "round": step, "epoch": EPOCHS_AT[step],
                         "train_loss": 2.4 - 0.1 * step, "train_acc": v, "val_loss": first_loss if step == 1 else
                         2.3 - 0.1 * step, "val_acc": v})
    return pd.DataFrame(rows)


def test_curves_mark_one_round_trials_and_cut_the_loss_axis(tmp_path, monkeypatch):
    history = history_csv(TRIALS)
    figures = []
    save = report.save_figure
    monkeypatch.setattr(report, "save_figure", lambda fig, path: (figures.append(fig), save(fig, path))[1])
    png, caption = report.plot_curves(history, ["t0", "t6", "t1"], tmp_path / "curves.png", n_classes=10)
    assert png == "curves.png" and (tmp_path / "curves.png").is_file()
    ax_loss, ax_acc = figures[0].axes
    one_round = [line for line in ax_acc.get_lines() if len(line.get_xdata()) == 1]
    assert len(one_round) == 4                                  # t6 and t1: train and validation each
    assert all(line.get_marker() not in (None, "None", "") for line in one_round)
    assert ax_loss.get_ylim()[1] == pytest.approx(2 * math.log(10))
    assert "1 round(s) lie above it, the highest 38 (trial t6, epoch 0.5)" in caption
    assert report.epochs_of_rounds(history) == EPOCHS_AT
    plt.close("all")


@pytest.mark.slow
def test_a_real_asha_search_reports_every_trial(tmp_path, cifar_dir):
    """A real search on a CIFAR-10 subset (the suite's test-sized space: 6 trials, ASHA rungs at rounds
    1 and 3 of 4; `search simple_cnn --quick` behaves the same at several times the cost): ASHA stops
    most trials, and every trial that reported a round is in the history, the parallel coordinates
    and the importance (or the report says why not)."""
    rc, out, err = run_cli("search", TINY, "--subset", 2000, "--data-dir", cifar_dir,
                           "--results-dir", tmp_path, "--name", "q", "--seed", 1, timeout=1500)
    assert rc == 0, err[-3000:]
    exp = tmp_path / "q"
    trials = pd.read_csv(exp / "trials.csv", dtype={"trial_id": str})
    assert (trials["status"] == "stopped").sum() >= 2, "ASHA stopped too few trials to test anything"
    study = optuna.load_study(study_name="q", storage=f"sqlite:///{exp / 'optuna.db'}")
    assert sum(t.state == TrialState.PRUNED for t in study.trials) >= 2
    with_rounds = {t.number: t.intermediate_values for t in study.trials if t.intermediate_values}
    assert len(with_rounds) == (trials["rounds"] > 0).sum()
    history, parallel, importance = search_pictures(study, "val_acc", report.epochs_of_rounds(
        pd.read_csv(exp / "history.csv", dtype={"trial_id": str})))
    got = history_points(history.ax)
    assert set(got) == set(with_rounds)
    for n, iv in with_rounds.items():
        assert got[n][1] == pytest.approx(iv[max(iv)]) and f"round {max(iv)}" in got[n][0]
    (lines,) = [c for c in parallel.ax.collections if len(c.get_segments())]
    assert sorted(round(float(s[0][1]), 6) for s in lines.get_segments()) == \
        sorted(round(iv[max(iv)], 6) for iv in with_rounds.values())
    text = (exp / "report.md").read_text()
    assert history.caption in text and parallel.caption in text
    assert (importance.caption if importance.ax is not None else importance.note) in text
    plt.close("all")
