"""`compare MODEL`: scratch vs frozen vs full of one model, from the search experiments in a results
folder. Reads folders only and never starts Ray; running the missing searches (`--run-missing`)
is the CLI's job, through the same `search` command a user would type.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .folders import find_experiment, read_json, write_csv, write_text
from ..core.finals import final_label, final_of
from .pages import markdown, save_figure
from .report import overfitting_gap

MODES = ("scratch", "frozen", "full")


def missing_modes(model: str, results_dir: Path) -> list[str]:
    """The modes of `model` with no finished search yet (simple_cnn has only scratch)."""
    from ..training.models import entry
    entry(model)
    return [m for m in MODES if (model != "simple_cnn" or m == "scratch")
            and find_experiment(results_dir, model, m) is None]


def compare_modes(model: str, results_dir: Path) -> pd.DataFrame:
    import matplotlib.pyplot as plt
    import numpy as np

    from ..training.models import entry
    entry(model)
    rows = []
    for mode in MODES:
        exp = find_experiment(results_dir, model, mode)
        if exp is None:
            rows.append({"mode": mode, "experiment": None})
            continue
        best = read_json(exp / "best.json")
        trials = pd.read_csv(exp / "trials.csv", dtype={"trial_id": str})
        history = pd.read_csv(exp / "history.csv", dtype={"trial_id": str})
        gpu = best.get("resources", {}).get("gpu", 0)
        search_s = best.get("phases", {}).get("search", float(trials["seconds"].sum()))
        rows.append({"mode": mode, "experiment": exp.name, "val_acc": best["val_acc"], "test_acc": best["test_acc"],
                     "wall_s": best.get("wall_s", round(sum(best.get("phases", {}).values()), 1)),
                     "final": final_label(final_of(best)), "epochs": best["epochs"], "trials": best["trials"],
                     "gpu_hours": round(gpu * float(trials["seconds"].sum()) / 3600, 4),
                     "search_s": search_s, "overfit_gap": overfitting_gap(history, best["best_trial"])})
    table = pd.DataFrame(rows)
    out = Path(results_dir) / f"compare_{model}"
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "compare.csv", table)
    write_text(out / "compare.md",
               f"# {model}: scratch vs frozen vs full\n\n{markdown(table)}\n\n![compare](compare.png)\n")
    done = table.dropna(subset=["test_acc"]) if "test_acc" in table else table.iloc[0:0]
    fig, ax = plt.subplots(figsize=(6, 4))
    if len(done):
        x = np.arange(len(done))
        ax.bar(x - 0.2, done["val_acc"], 0.4, label="validation")
        ax.bar(x + 0.2, done["test_acc"], 0.4, label="test")
        ax.set_xticks(x, done["mode"])
        ax.legend()
    ax.set(ylabel="accuracy", title=f"{model}: training modes compared")
    save_figure(fig, out / "compare.png")
    print(table.to_string(index=False))
    print(f"written to {out}")
    return table
