"""search --cv-top: search, cross-validate the shortlist, retrain the winner, test once; and --resume at
each stage. Real CIFAR-10 subsets on one local Ray for the module."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from conftest import TINY

pytestmark = pytest.mark.slow          # end-to-end runs: `pytest -m 'not slow'` leaves them out


@pytest.fixture()
def test_evaluations(monkeypatch):
    """Counts every evaluation on the test set made by this process (the driver: trials never test)."""
    import tune_cifar.training.evaluate as fit
    calls = []
    real = fit.evaluate_test

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(fit, "evaluate_test", counted)
    return calls


def cv_top_args(cifar_dir, results, *extra):
    return ("search", TINY, "--data-dir", cifar_dir, "--subset", 2000, "--num-samples", 4, "--max-epochs", 1,
            "--cv-top", 2, "--k", 3, "--final", "retrain", "--results-dir", results, "--name", "sel", *extra)


def test_cv_top_selects_by_cross_validation_and_tests_once(ray_session, cli, cifar_dir, tmp_path, test_evaluations):
    rc, out, err = cli(*cv_top_args(cifar_dir, tmp_path))
    assert rc == 0, err
    exp = tmp_path / "sel"
    assert len(test_evaluations) == 1                         # the test set, looked at once
    best = json.loads((exp / "best.json").read_text())
    table = pd.read_csv(exp / "cv" / "kfold.csv")
    assert best["selected_by"] == "cv" and len(table) == 2 and table["k"].eq(3).all()
    winner = int(table.iloc[0]["config"])
    assert best["cv"]["winner"] == winner and best["cv"]["mean_acc"] == pytest.approx(table.iloc[0]["mean_acc"])
    trials = pd.read_csv(exp / "trials.csv", dtype={"trial_id": str})
    shortlist = trials.set_index("trial_id").loc[[s["trial_id"] for s in best["cv"]["shortlist"]]]
    assert list(shortlist["last_val_acc"]) == sorted(trials["last_val_acc"].dropna(), reverse=True)[:2]
    saved = torch.load(exp / "best_model.pt", weights_only=True)
    for key, value in best["best_config"].items():             # best_model.pt is the retrained winner
        assert saved["config"][key] == pytest.approx(value)
    assert saved["config"]["epochs"] == 1 and best["epochs"] == 1
    retrain = torch.load(exp / "retrain.pt", weights_only=True)
    assert len(retrain["history"]) == 2                       # 1 epoch x 2 evaluations, on all 2,000 images
    assert best["precision_used"] == retrain["history"][-1]["precision_used"] in {"bf16", "fp32"}
    preds = json.loads((exp / "test_predictions.json").read_text())
    assert sum(map(sum, best["confusion_matrix"])) == len(preds["labels"]) == 10_000
    report = (exp / "report.md").read_text()
    assert "Selection: search, then cross-validation, then one test" in report and "winner's curse" in report
    assert f"test_acc={best['test_acc']:.4f}" in out

    # interrupted after the test but before best.json: --resume writes it without testing again
    (exp / "best.json").unlink()
    test_evaluations.clear()
    rc, out, err = cli(*cv_top_args(cifar_dir, tmp_path, "--resume"))
    assert rc == 0 and not test_evaluations and (exp / "best.json").is_file(), err
    # --resume at each earlier stage: everything after it is done again, the test once per command
    for stage_files in (["best.json", "test.json"], ["best.json", "test.json", "retrain.pt"],
                        ["best.json", "test.json", "retrain.pt", "cv"]):
        for name in stage_files:
            path = exp / name
            if path.is_dir():
                import shutil
                shutil.rmtree(path)
            else:
                path.unlink()
        test_evaluations.clear()
        rc, out, err = cli(*cv_top_args(cifar_dir, tmp_path, "--resume"))
        assert rc == 0, (stage_files, err)
        assert len(test_evaluations) == 1, stage_files
        assert "search stage already done" in out
        again = json.loads((exp / "best.json").read_text())
        assert again["cv"]["winner"] == winner
    test_evaluations.clear()
    rc, out, _ = cli(*cv_top_args(cifar_dir, tmp_path, "--resume"))
    assert rc == 0 and "already finished" in out and not test_evaluations


@pytest.mark.parametrize("extra, message", [
    (("--cv-top", 0), "--cv-top=0 must be at least 1"),
    (("--cv-top", 2, "--repeats", 0), "--repeats=0 must be at least 1"),
    (("--cv-top", 2, "--k", 500), "--k=500 is larger than the 200 images of the rarest class"),
])
def test_bad_cv_flags_are_one_line_errors(extra, message, cli, cifar_dir, tmp_path):
    rc, _, err = cli("search", TINY, "--data-dir", cifar_dir, "--subset", 2000, "--results-dir", tmp_path / "r", *extra)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "r").exists()


def test_compare_modes_cross_validated_on_the_same_folds(ray_session, cli, cifar_dir, tmp_path):
    import torchvision
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    rc, out, err = cli("compare", "resnet18", "--k", 2, "--weights", weights, "--data-dir", cifar_dir,
                       "--subset", 400, "--epochs", 1, "--set", "resolution=32", "--set", "batch_size=64",
                       "--results-dir", tmp_path)
    assert rc == 0, err
    exp = tmp_path / "compare_cv_resnet18"
    table = pd.read_csv(exp / "kfold.csv")
    folds = pd.read_csv(exp / "kfold_folds.csv")
    assert sorted(table["mode"]) == ["frozen", "full", "scratch"]
    assert "resolution" not in table        # --set resolution=32 made it the same for every mode
    assert len(folds) == 6 and set(folds["status"]) == {"completed"}
    # every mode saw the same 2 splits: the paired statistics compare them split by split
    assert folds.groupby("fold")["config"].nunique().eq(3).all()
    best = table.iloc[0]
    assert best["tied_with_best"] and pd.isna(best["p_vs_best"])
    assert table.iloc[1:]["p_holm"].notna().all()             # each other mode tested against the best
    verdicts = [line for line in out.splitlines() if line.rstrip().endswith(("tied with best", "(p_holm < 0.05)"))]
    assert len(verdicts) == 2, out
    assert (exp / "report.md").read_text().count("Statistically tied with the best") == 1
