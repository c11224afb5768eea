"""Read an experiment folder, write pictures and report.md; compare the training modes of a model.

Only reads what search / kfold / train wrote (CSV, JSON, the Optuna study), so a report can be
re-made at any time: `python -m tune_cifar report EXP`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")                                   # files only, never a window
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .config import UserError
from .results import read_json, write_csv, write_png, write_text
from .tuning import SUCCEEDED, ranked_trials

TOP_CURVES = 4


def overfitting_gap(history: pd.DataFrame, trial_id: str) -> float:
    """Train minus validation accuracy of a trial's last reported round (NaN if it reported none)."""
    h = history[history["trial_id"] == trial_id]
    return float(h["train_acc"].iloc[-1] - h["val_acc"].iloc[-1]) if len(h) else math.nan


def experiment_path(results_dir: Path, name: str) -> Path:
    p = Path(name) if Path(name).is_dir() and (Path(name) / "spec.yaml").exists() else Path(results_dir) / name
    if not p.is_dir():
        raise UserError(f"no experiment folder {p}")
    return p


def _save(fig, path: Path) -> str:
    write_png(path, fig)
    plt.close(fig)
    return path.name


# --------------------------------------------------------------------------- search plots

def plot_curves(history: pd.DataFrame, trial_ids: list[str], path: Path) -> str:
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for i, tid in enumerate(trial_ids):
        h = history[history["trial_id"] == tid]
        color = f"C{i}"
        label = f"{tid}{' (best)' if i == 0 else ''}"
        ax_loss.plot(h["epoch"], h["train_loss"], color=color, ls="--", alpha=0.8)
        ax_loss.plot(h["epoch"], h["val_loss"], color=color, label=label)
        ax_acc.plot(h["epoch"], h["train_acc"], color=color, ls="--", alpha=0.8)
        ax_acc.plot(h["epoch"], h["val_acc"], color=color, label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss (dashed: train, solid: validation)")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy (dashed: train, solid: validation)")
    ax_acc.legend(fontsize=8)
    return _save(fig, path)


def plot_rungs(history: pd.DataFrame, trials: pd.DataFrame, path: Path) -> str:
    """Validation accuracy against epochs for every trial: ASHA's rungs show as where lines end."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"completed": "C2", "stopped": "C0", "early_stopped": "C4", "diverged": "C3", "error": "C3", "oom": "C1"}
    for _, t in trials.iterrows():
        h = history[history["trial_id"] == t["trial_id"]]
        if len(h):
            ax.plot(h["epoch"], h["val_acc"], marker=".", color=colors.get(t["status"], "C7"), alpha=0.7)
    for status, color in colors.items():
        if (trials["status"] == status).any():
            ax.plot([], [], color=color, label=f"{status} ({int((trials['status'] == status).sum())})")
    ax.set(xlabel="epoch", ylabel="validation accuracy", title="every trial (ASHA stops the weak at its rungs)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_history(trials: pd.DataFrame, path: Path) -> str:
    order = trials.assign(n=trials["trial_id"].astype(str)).reset_index(drop=True)
    acc = order["last_val_acc"].astype(float)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(range(1, len(acc) + 1), acc, c=["C0" if s in SUCCEEDED else "C3" for s in order["status"]], s=18)
    ax.plot(range(1, len(acc) + 1), acc.fillna(0).cummax(), color="C2", label="best so far")
    ax.set(xlabel="trial (in the order the searcher proposed it)", ylabel="last validation accuracy",
           title="optimisation history")
    ax.legend()
    return _save(fig, path)


def plot_parallel(trials: pd.DataFrame, searched: list[str], path: Path) -> str:
    """Parallel coordinates: each hyper-parameter scaled to [0, 1] (log for ranges spanning > 10x)."""
    ok = trials[trials["status"].isin(SUCCEEDED)].dropna(subset=["last_val_acc"])
    cols = []
    for key in searched:
        v = ok[key]
        if pd.api.types.is_numeric_dtype(v) and not pd.api.types.is_bool_dtype(v):
            v = v.astype(float)
            if v.min() > 0 and v.max() / v.min() > 10:
                v = np.log10(v)
        else:
            v = v.astype("category").cat.codes.astype(float)
        span = (v.max() - v.min()) or 1.0
        cols.append((v - v.min()) / span)
    fig, ax = plt.subplots(figsize=(1.6 * (len(searched) + 1) + 2, 4.5))
    acc = ok["last_val_acc"].astype(float).to_numpy()
    norm = plt.Normalize(acc.min() if len(acc) else 0, acc.max() if len(acc) else 1)
    for i in range(len(ok)):
        ys = [c.iloc[i] for c in cols] + [norm(acc[i])]
        ax.plot(range(len(ys)), ys, color=plt.cm.viridis(norm(acc[i])), alpha=0.8)
    ax.set_xticks(range(len(searched) + 1), [*searched, "val_acc"])
    ax.set_yticks([])
    ax.set_title("parallel coordinates (colour: validation accuracy)")
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax)
    return _save(fig, path)


def plot_importance(exp: Path, path: Path) -> tuple[str | None, str]:
    """Optuna's fANOVA importances on the stored study; needs a few finished trials."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=exp.name, storage=f"sqlite:///{(exp / 'optuna.db').resolve()}")
        importances = optuna.importance.get_param_importances(study)
    except Exception as e:                              # too few trials, a single value, ...
        return None, f"hyper-parameter importance not computed ({type(e).__name__}: {str(e)[:120]})"
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(importances) + 1.5))
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names], color="C0")
    ax.set(xlabel="importance (fANOVA)", title="hyper-parameter importance")
    return _save(fig, path), ""


# --------------------------------------------------------------------------- test-set plots

def plot_confusion(cm: np.ndarray, classes: list[str], path: Path) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    normed = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    for ax, m, title, fmt in ((axes[0], cm, "counts", "d"), (axes[1], normed, "normalised by true class", ".2f")):
        ax.imshow(m, cmap="Blues")
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
        ax.set_yticks(range(len(classes)), classes)
        ax.set(xlabel="predicted", ylabel="true", title=f"confusion matrix ({title})")
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, format(m[i, j], fmt), ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] > m.max() / 2 else "black")
    return _save(fig, path)


def per_class_table(labels: np.ndarray, preds: np.ndarray, classes: list[str]) -> pd.DataFrame:
    from sklearn.metrics import precision_recall_fscore_support
    p, r, f1, support = precision_recall_fscore_support(labels, preds, labels=list(range(len(classes))),
                                                        zero_division=0)
    return pd.DataFrame({"class": classes, "precision": p, "recall": r, "f1": f1, "support": support})


def plot_per_class(table: pd.DataFrame, path: Path) -> str:
    fig, ax = plt.subplots(figsize=(10, 4))
    x = np.arange(len(table))
    for i, metric in enumerate(("precision", "recall", "f1")):
        ax.bar(x + (i - 1) * 0.27, table[metric], width=0.27, label=metric)
    ax.set_xticks(x, table["class"], rotation=30, ha="right")
    ax.set(ylim=(0, 1), ylabel="score", title="per-class precision / recall / F1 on the test set")
    ax.legend()
    return _save(fig, path)


# --------------------------------------------------------------------------- the report

def write_report(exp: Path) -> Path:
    exp = Path(exp)
    if (exp / "kfold.csv").exists():
        return report_kfold(exp)
    if not (exp / "best.json").exists() or not (exp / "trials.csv").exists():
        raise UserError(f"{exp}: not a finished search (best.json / trials.csv missing)")
    import yaml
    best = read_json(exp / "best.json")
    spec = yaml.safe_load((exp / "spec.yaml").read_text())
    searched = list(spec["space"])
    trials = pd.read_csv(exp / "trials.csv", dtype={"trial_id": str})
    history = pd.read_csv(exp / "history.csv", dtype={"trial_id": str})
    images: dict[str, str] = {}
    notes = []

    ranked = ranked_trials(trials)
    top = [best["best_trial"]] + [t for t in ranked["trial_id"] if t != best["best_trial"]][:TOP_CURVES - 1]
    images["Training curves (best and runners-up)"] = plot_curves(history, top, exp / "curves.png")
    images["Validation accuracy of every trial"] = plot_rungs(history, trials, exp / "trials_epochs.png")
    images["Optimisation history"] = plot_history(trials, exp / "history.png")
    if len(ranked) >= 2:
        images["Parallel coordinates"] = plot_parallel(trials, searched, exp / "parallel.png")
    name, note = plot_importance(exp, exp / "importance.png")
    if name:
        images["Hyper-parameter importance"] = name
    elif note:
        notes.append(note)

    pred = read_json(exp / "test_predictions.json")
    labels, preds, classes = np.array(pred["labels"]), np.array(pred["predictions"]), pred["classes"]
    from sklearn.metrics import confusion_matrix
    cm = confusion_matrix(labels, preds, labels=list(range(len(classes))))
    images["Confusion matrix (test set)"] = plot_confusion(cm, classes, exp / "confusion.png")
    table = per_class_table(labels, preds, classes)
    write_csv(exp / "per_class.csv", table)
    images["Per-class precision / recall / F1 (test set)"] = plot_per_class(table, exp / "per_class.png")

    gap = overfitting_gap(history, best["best_trial"])
    cfg = best["config"]
    lines = [f"# {best['experiment']}", "",
             f"Command: `{spec.get('command', '?')}`", "",
             f"Search space `{spec['source']}`: {spec.get('description', '')}. "
             f"Data: {cfg['data_dir']}, subset {cfg['subset'] or 'all 50,000'} training images "
             f"({cfg['val_fraction']:.0%} held out for validation), test set 10,000 images.", "",
             "## Result", "",
             "| | |", "|---|---|",
             f"| best trial | {best['best_trial']} |",
             f"| validation accuracy | {best['val_acc']:.4f} |",
             f"| **test accuracy** | **{best['test_acc']:.4f}** |",
             f"| epochs trained | {best['epochs']:g} |",
             f"| overfitting gap (train - val accuracy, last epoch) | {gap:+.4f} |",
             f"| trials | {best['trials']} ({', '.join(f'{v} {k}' for k, v in best['status_counts'].items())}) |",
             f"| time per phase (s) | {', '.join(f'{k} {v:.0f}' for k, v in best.get('phases', {}).items())} |",
             "", "Best configuration: " + ", ".join(f"`{k}={v}`" for k, v in best["best_config"].items()), ""]
    lines += ["## Trials", "", _markdown(ranked.head(10)[["trial_id", "status", *searched, "last_val_acc", "epochs",
                                                          "seconds"]]), ""]
    lines += ["## Per class (test set)", "", _markdown(table), ""]
    for title, img in images.items():
        lines += [f"## {title}", "", f"![{title}]({img})", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return write_text(exp / "report.md", "\n".join(lines))


def _markdown(df: pd.DataFrame) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    rows = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    rows += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join(rows)


# --------------------------------------------------------------------------- kfold

def plot_kfold(exp: Path) -> str:
    table = pd.read_csv(exp / "kfold.csv").sort_values("mean_acc", ascending=False)
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(table) + 2), 4))
    x = np.arange(len(table))
    ax.bar(x, table["mean_acc"], yerr=table["std_acc"].fillna(0), capsize=5, color="C0", alpha=0.8)
    folds = [c for c in table.columns if c.startswith("fold_")]
    for i, (_, row) in enumerate(table.iterrows()):
        ax.scatter([i] * len(folds), row[folds], color="k", s=10, zorder=3)
    ax.set_xticks(x, [f"config {int(c)}" for c in table["config"]], rotation=30, ha="right")
    lo = np.nanmin(table[folds].to_numpy(dtype=float)) if len(table) else 0
    ax.set(ylabel="validation accuracy", ylim=(max(0, lo - 0.05), min(1, np.nanmax(table["max_acc"]) + 0.03)),
           title=f"K-fold accuracy, mean +- std (k={int(table['k'].iloc[0])}), ranked")
    return _save(fig, exp / "kfold.png")


def report_kfold(exp: Path) -> Path:
    table = pd.read_csv(exp / "kfold.csv")
    img = plot_kfold(exp)
    import yaml
    spec = yaml.safe_load((exp / "spec.yaml").read_text())
    lines = [f"# {exp.name}", "", f"Command: `{spec.get('command', '?')}`", "",
             f"{int(table['k'].iloc[0])}-fold stratified cross-validation of {len(table)} configuration(s) "
             f"of `{spec['source']}`; std is the sample standard deviation (ddof=1).", "",
             _markdown(table), "", f"![k-fold]({img})", ""]
    return write_text(exp / "report.md", "\n".join(lines))


# --------------------------------------------------------------------------- compare modes

def compare(model: str, results_dir: Path, run_missing: bool = False, data_dir: str | None = None,
            weights: str | None = None) -> pd.DataFrame:
    """scratch vs frozen vs full of one model, from the search experiments in results_dir."""
    from .models import entry
    entry(model)
    rows = []
    for mode in ("scratch", "frozen", "full"):
        exp = _find_experiment(Path(results_dir), model, mode)
        if exp is None and run_missing and (model != "simple_cnn" or mode == "scratch"):
            from .search import SearchOptions, plan_search, run_search
            name = f"{model}_{mode}"
            run_search(plan_search(name, SearchOptions(results_dir=Path(results_dir), quick=True, data_dir=data_dir,
                                                       weights=weights, name=f"{name}_quick")))
            exp = Path(results_dir) / f"{name}_quick"
        if exp is None:
            rows.append({"mode": mode, "experiment": None})
            continue
        best = read_json(exp / "best.json")
        trials = pd.read_csv(exp / "trials.csv", dtype={"trial_id": str})
        history = pd.read_csv(exp / "history.csv", dtype={"trial_id": str})
        gpu = best.get("resources", {}).get("gpu", 0)
        search_s = best.get("phases", {}).get("search", float(trials["seconds"].sum()))
        rows.append({"mode": mode, "experiment": exp.name, "val_acc": best["val_acc"], "test_acc": best["test_acc"],
                     "wall_s": round(sum(best.get("phases", {}).values()), 1), "epochs": best["epochs"],
                     "trials": best["trials"], "gpu_hours": round(gpu * float(trials["seconds"].sum()) / 3600, 4),
                     "search_s": search_s,
                     "overfit_gap": overfitting_gap(history, best["best_trial"])})
    table = pd.DataFrame(rows)
    out = Path(results_dir) / f"compare_{model}"
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "compare.csv", table)
    write_text(out / "compare.md",
               f"# {model}: scratch vs frozen vs full\n\n{_markdown(table)}\n\n![compare](compare.png)\n")
    done = table.dropna(subset=["test_acc"]) if "test_acc" in table else table.iloc[0:0]
    fig, ax = plt.subplots(figsize=(6, 4))
    if len(done):
        x = np.arange(len(done))
        ax.bar(x - 0.2, done["val_acc"], 0.4, label="validation")
        ax.bar(x + 0.2, done["test_acc"], 0.4, label="test")
        ax.set_xticks(x, done["mode"])
        ax.legend()
    ax.set(ylabel="accuracy", title=f"{model}: training modes compared")
    _save(fig, out / "compare.png")
    print(table.to_string(index=False))
    print(f"written to {out}")
    return table


def _find_experiment(results_dir: Path, model: str, mode: str) -> Path | None:
    """The newest finished search experiment of model x mode in results_dir."""
    import yaml
    found = []
    for spec_file in results_dir.glob("*/spec.yaml"):
        exp = spec_file.parent
        if not (exp / "best.json").exists() or (exp / "kfold.csv").exists():
            continue
        base = (yaml.safe_load(spec_file.read_text()) or {}).get("base", {})
        if base.get("model") == model and base.get("mode") == mode:
            found.append((spec_file.stat().st_mtime, exp))
    return max(found)[1] if found else None
