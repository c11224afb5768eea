"""Small data sets just work (issue 21, item 1): the shipped simple_cnn space and the --quick preset
fitted to a 2-class folder of 120 real CIFAR-10 images and to 1,500 grayscale ones (core/fitting.py):
batch sizes that cannot run dropped, evals_per_epoch fitted, the budget raised to MIN_STEPS optimizer
steps and recorded in plan.json; explicit values that cannot run stay one-line errors; CIFAR-size
plans unchanged."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tune_cifar.core.config import UserError
from tune_cifar.core.fitting import FALLBACK_BATCHES, MIN_BATCH, MIN_STEPS, fit_batch_sizes, fit_budget, fit_evals

NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def write_folder(root: Path, cifar, per_class: dict[str, int], classes: tuple[int, ...], mode: str = "RGB") -> Path:
    """train/ and test/ image folders of real CIFAR-10 images (`per_class`: images a class per split)."""
    for split, x, y in (("train", cifar.train_x, cifar.train_y), ("test", cifar.test_x, cifar.test_y)):
        for label in classes:
            d = root / split / NAMES[label]
            d.mkdir(parents=True)
            for i, idx in enumerate(np.flatnonzero(y == label)[:per_class[split]]):
                Image.fromarray(x[idx].transpose(1, 2, 0)).convert(mode).save(d / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def two_class(tmp_path_factory, cifar):
    """120 images: cat and ship, 50 a class in train/, 10 in test/."""
    return write_folder(tmp_path_factory.mktemp("two"), cifar, {"train": 50, "test": 10}, (3, 8))


@pytest.fixture(scope="module")
def gray(tmp_path_factory, cifar):
    """1,500 grayscale ('L') images of the 10 classes: 120 a class in train/, 30 in test/."""
    return write_folder(tmp_path_factory.mktemp("gray"), cifar, {"train": 120, "test": 30}, tuple(range(10)), "L")


# --------------------------------------------------------------------------- the rules, fast

def test_batch_sizes_larger_than_the_split_are_dropped_and_the_rest_kept():
    assert fit_batch_sizes((128, 256, 512), 45000, "space.batch_size") == ((128, 256, 512), None)
    kept, note = fit_batch_sizes((128, 256, 512), 450, "space.batch_size")
    assert kept == (128, 256) and note.startswith("note: space.batch_size: dropped batch size(s) 512")


def test_no_choice_left_halves_the_smallest_then_is_an_error():
    kept, note = fit_batch_sizes((128, 256, 512), 90, "space.batch_size")
    assert kept == (16,) and 90 // 16 >= FALLBACK_BATCHES and "using 16" in note
    with pytest.raises(UserError, match=f"smallest fallback \\({MIN_BATCH}\\)"):
        fit_batch_sizes((128, 256, 512), MIN_BATCH - 1, "space.batch_size")


def test_evals_per_epoch_and_budget_rules():
    assert fit_evals(2, 450, 256) == 1 and fit_evals(2, 1800, 512) == 2 and fit_evals(2, 45000, 512) == 2
    assert fit_budget(5, 0.5, 2, 45000 // 128) == (5, 0.5)             # CIFAR: 1,755 steps already
    epochs, grace = fit_budget(5, 0.5, 2, 1800 // 128)
    assert epochs * (1800 // 128) >= MIN_STEPS > (epochs - 1) * (1800 // 128)
    assert grace / epochs == pytest.approx(0.5 / 5, abs=0.5 / epochs)  # the grace period keeps its share


def plan(kind: str, data, tmp_path, **kw):
    if kind == "search":
        from tune_cifar.commands.search import SearchOptions, plan_search
        return plan_search("simple_cnn", SearchOptions(data_dir=str(data), results_dir=tmp_path, **kw))
    from tune_cifar.commands.kfold import KFoldOptions, plan_kfold
    return plan_kfold("simple_cnn", KFoldOptions(data_dir=str(data), results_dir=tmp_path, **kw))


def test_cifar_plans_are_unchanged(cifar_dir, tmp_path, capsys):
    for quick in (False, True):
        p = plan("search", cifar_dir, tmp_path, quick=quick)
        spec = p.record()["spec"]
        assert spec["space"]["batch_size"] == {"choice": [128, 256, 512]}
        assert spec["base"]["evals_per_epoch"] == 2 and spec["budget"]["grace_period"] == 0.5
        assert spec["budget"]["max_epochs"] == (4 if quick else 5) and "fitting" not in p.record()
        assert p.opts.subset == (10000 if quick else None)
    k = plan("kfold", cifar_dir, tmp_path, k=3)
    assert k.record()["base"]["epochs"] == 5 and k.record()["base"]["evals_per_epoch"] == 2
    assert "fitting" not in k.record() and "note:" not in capsys.readouterr().out


def test_two_class_folder_plan_is_fitted_and_recorded(two_class, tmp_path, capsys):
    p = plan("search", two_class, tmp_path, quick=True)
    out = capsys.readouterr().out
    assert "--subset" not in out and "--quick trains on a subset of 10,000 images" in out
    fitting = p.record()["fitting"]
    assert fitting["n_train"] == 90 and p.opts.subset is None                    # 100 less 10 % validation
    spec = p.record()["spec"]
    assert spec["space"]["batch_size"] == {"choice": [16]} and spec["default"]["batch_size"] == 16
    assert spec["base"]["evals_per_epoch"] == 1
    epochs = spec["budget"]["max_epochs"]
    assert epochs == fitting["changed"]["max_epochs"]["to"] and epochs * (90 // 16) >= MIN_STEPS
    assert fitting["changed"]["max_epochs"]["from"] == 4 and spec["base"]["epochs"] == epochs
    assert out.count("note: budget:") == 1 and not p.exp.exists()                # planned, nothing written
    # --cv-top: fitted to the smallest fold's training part (100 less a third)
    cv = plan("search", two_class, tmp_path, cv_top=2, k=3)
    assert cv.record()["fitting"]["n_train"] == 66
    # an explicit budget is kept
    given = plan("search", two_class, tmp_path, max_epochs=3)
    assert given.record()["spec"]["budget"]["max_epochs"] == 3


@pytest.mark.parametrize("fixed, message", [
    ({"batch_size": 512}, "batch_size=512 is larger than the 66 training images"),
    ({"batch_size": 64, "evals_per_epoch": 2}, "fewer than evals_per_epoch=2"),
    ({"evals_per_epoch": 20}, "fewer than evals_per_epoch=20")])
def test_explicit_values_that_cannot_run_are_one_line_errors(two_class, tmp_path, cli, fixed, message):
    sets = [a for k, v in fixed.items() for a in ("--set", f"{k}={v}")]
    rc, out, err = cli("kfold", "simple_cnn", "--k", 3, *sets, "--data-dir", two_class,
                       "--results-dir", tmp_path / "r")
    assert rc == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "r").exists()


def test_a_space_with_no_possible_choice_is_a_one_line_error(tmp_path, cifar, cli):
    data = write_folder(tmp_path / "d", cifar, {"train": 6, "test": 1}, (3, 8))   # 12 images: 6 a fold's training part
    rc, out, err = cli("kfold", "simple_cnn", "--k", 2, "--data-dir", data, "--results-dir", tmp_path / "r")
    assert rc == 2 and err.count("\n") == 1 and "every batch size (128, 256, 512) is larger" in err, err
    assert not (tmp_path / "r").exists()


def test_resume_reads_the_fitted_plan_back(two_class, tmp_path, capsys):
    """plan.json is the single source of truth: --resume runs exactly the fitted spec, fits nothing again."""
    from tune_cifar.commands.search import SearchOptions, plan_search
    from tune_cifar.results.folders import start_experiment, write_json
    first = plan("search", two_class, tmp_path, name="r", quick=True)
    start_experiment(first.exp, overwrite=False)              # what run() does before it is interrupted
    write_json(first.exp / "plan.json", first.record())
    capsys.readouterr()
    resumed = plan_search("simple_cnn", SearchOptions(results_dir=tmp_path, name="r", resume=True))
    assert resumed.record()["spec"] == first.record()["spec"]
    assert resumed.record()["fitting"] == first.record()["fitting"]
    assert "note:" not in capsys.readouterr().out


# --------------------------------------------------------------------------- end to end, with Ray
# Every command of the issue, through the CLI, on the shipped simple_cnn space. The fitted budget
# (tens of epochs) runs under a clock (--time-budget ends the search, the best trial is tested);
# the other commands take a short explicit budget, the batch sizes and evaluations still fitted.

def run_ok(cli, *args) -> str:
    rc, out, err = cli(*args, "--no-report", "--no-tensorboard", "--offline")
    assert rc == 0, err[-3000:]
    return out


def best_of(results: Path, name: str) -> dict:
    best = json.loads((results / name / "best.json").read_text())
    assert 0 <= best["test_acc"] <= 1 and best["test_source"].endswith("test")
    return best


@pytest.mark.slow
def test_two_class_folder_search_kfold_and_cv_top(two_class, tmp_path, cli, ray_session):
    r = tmp_path / "results"
    data = ("--data-dir", two_class, "--results-dir", r)
    out = run_ok(cli, "search", "simple_cnn", "--quick", "--time-budget", 240, "--name", "q", *data)
    assert "note: budget:" in out and "--subset" not in out
    best, planned = best_of(r, "q"), json.loads((r / "q" / "plan.json").read_text())
    assert best["classes"] == ["cat", "ship"] and best["config"]["batch_size"] == 16
    assert best["config"]["epochs"] == planned["spec"]["budget"]["max_epochs"] >= MIN_STEPS // (90 // 16)
    run_ok(cli, "search", "simple_cnn", "--num-samples", 2, "--max-epochs", 2, "--name", "s", *data)
    assert best_of(r, "s")["config"]["batch_size"] == 16
    run_ok(cli, "kfold", "simple_cnn", "--k", 3, "--epochs", 2, "--name", "k", *data)
    assert (r / "k" / "kfold_folds.csv").read_text().count("completed") == 3
    run_ok(cli, "search", "simple_cnn", "--cv-top", 2, "--k", 3, "--num-samples", 2, "--max-epochs", 2,
           "--name", "cv", *data)
    best = best_of(r, "cv")
    assert best["selected_by"] == "cv" and best["cv"]["k"] == 3


@pytest.mark.slow
def test_grayscale_folder_search_kfold_and_cv_top(gray, tmp_path, cli, ray_session):
    """1,200 training images in 'L' mode; a fold's 800 hold one batch of 512: evals_per_epoch 1."""
    r = tmp_path / "results"
    data = ("--data-dir", gray, "--results-dir", r)
    run_ok(cli, "search", "simple_cnn", "--quick", "--time-budget", 300, "--name", "q", *data)
    assert len(best_of(r, "q")["classes"]) == 10
    changed = json.loads((r / "q" / "plan.json").read_text())["fitting"]["changed"]
    assert changed["max_epochs"]["to"] * (1080 // 128) >= MIN_STEPS
    run_ok(cli, "search", "simple_cnn", "--num-samples", 2, "--max-epochs", 1, "--name", "s", *data)
    best_of(r, "s")
    run_ok(cli, "kfold", "simple_cnn", "--k", 3, "--epochs", 1, "--name", "k", *data)
    planned = json.loads((r / "k" / "plan.json").read_text())
    assert planned["base"]["evals_per_epoch"] == 1 and planned["base"]["epochs"] == 1
    assert (r / "k" / "kfold_folds.csv").read_text().count("completed") == 3
    run_ok(cli, "search", "simple_cnn", "--cv-top", 2, "--k", 3, "--num-samples", 2, "--max-epochs", 1,
           "--name", "cv", *data)
    best = best_of(r, "cv")
    assert best["selected_by"] == "cv" and best["config"]["evals_per_epoch"] == 1
