"""Read an experiment folder, write pictures and report.md; compare the training modes of a model.

Only reads what search / kfold / train wrote (CSV, JSON, the Optuna study), so a report can be
re-made at any time: `python -m tune_cifar report EXP`.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")                                   # files only, never a window
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..core.config import UserError
from ..core.finals import final_line, final_of
from .folders import ranked_trials, read_json, read_yaml, write_csv
from .pages import markdown, save_figure, write_markdown_report

TOP_CURVES = 4
METRIC = "val_acc"                      # what the search maximised (the study's value)


def overfitting_gap(history: pd.DataFrame, trial_id: str) -> float:
    """Train minus validation accuracy of a trial's last reported round (NaN if it reported none)."""
    h = history[history["trial_id"] == trial_id]
    return float(h["train_acc"].iloc[-1] - h["val_acc"].iloc[-1]) if len(h) else math.nan


# --------------------------------------------------------------------------- search plots

LOSS_CAP = 2.0      # the loss axis ends at LOSS_CAP x ln(classes), the loss of a uniform guess


def loss_limit(losses: pd.Series, n_classes: int | None) -> float | None:
    """Top of the loss axis: LOSS_CAP x ln(n_classes) when some loss is above it, else None (matplotlib
    chooses). A trial far worse than guessing in its first round (e.g. 38 where guessing scores 2.3)
    would otherwise squash every other curve into the bottom of the axis."""
    if not n_classes or n_classes < 2 or losses.empty:
        return None
    cap = LOSS_CAP * math.log(n_classes)
    return cap if float(losses.max()) > cap else None


def plot_curves(history: pd.DataFrame, trial_ids: list[str], path: Path,
                n_classes: int | None = None) -> tuple[str, str]:
    """Train (dashed) and validation (solid) loss and accuracy of `trial_ids`, a marker at every
    evaluation round, so a trial stopped at the first rung (one round) shows as a point.
    (png name, caption saying where the loss axis was cut)."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for i, tid in enumerate(trial_ids):
        h = history[history["trial_id"] == tid]
        color = f"C{i}"
        label = f"{tid}{' (best)' if i == 0 else ''}{' (1 round)' if len(h) == 1 else ''}"
        ax_loss.plot(h["epoch"], h["train_loss"], color=color, ls="--", alpha=0.8, marker=".")
        ax_loss.plot(h["epoch"], h["val_loss"], color=color, label=label, marker="o", ms=4)
        ax_acc.plot(h["epoch"], h["train_acc"], color=color, ls="--", alpha=0.8, marker=".")
        ax_acc.plot(h["epoch"], h["val_acc"], color=color, label=label, marker="o", ms=4)
    shown = history[history["trial_id"].isin(trial_ids)]
    losses = pd.concat([shown["train_loss"], shown["val_loss"]]).dropna()
    top = loss_limit(losses, n_classes)
    caption = "Markers: the evaluation rounds (a trial with one round is a single point)."
    loss_title = "loss (dashed: train, solid: validation)"
    if top is not None:
        above = shown[(shown["val_loss"] > top) | (shown["train_loss"] > top)]
        worst = shown.loc[shown[["train_loss", "val_loss"]].max(axis=1).idxmax()]
        low = float(losses.min())
        ax_loss.set_ylim(bottom=max(0.0, low - 0.05 * (top - low)), top=top)
        loss_title += f"\naxis cut at {top:.2f} = {LOSS_CAP:g} x ln({n_classes})"
        caption += (f" The loss axis ends at {top:.2f} ({LOSS_CAP:g} x ln {n_classes}, twice the loss of a "
                    f"uniform guess): {len(above)} round(s) lie above it, the highest "
                    f"{max(worst['train_loss'], worst['val_loss']):.3g} (trial {worst['trial_id']}, epoch "
                    f"{worst['epoch']:g}).")
    ax_loss.set(xlabel="epoch", ylabel="loss", title=loss_title)
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy (dashed: train, solid: validation)")
    ax_acc.legend(fontsize=8)
    return save_figure(fig, path), caption


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
    return save_figure(fig, path)


def load_study(exp: Path):
    """The experiment's Optuna study (optuna.db), or None (random search, kfold, no finished trial)."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db = exp / "optuna.db"
    if not db.is_file():
        return None
    try:
        return optuna.load_study(study_name=exp.name, storage=f"sqlite:///{db.resolve()}")
    except (KeyError, ValueError):
        return None


def optuna_plots(exp: Path, epochs_at: dict[int, float] | None = None
                 ) -> tuple[dict[str, str], list[str], dict[str, str]]:
    """Optuna's own matplotlib plots of every trial in the study that reported a round, pruned ones
    at the round they reached (search_plots.py): optimisation history, parallel coordinates, fANOVA
    importance. ({title: png, or None where the plot could say nothing}, notes, {title: caption, or
    for a plot not drawn the reason})."""
    from .search_plots import search_pictures      # imports Optuna, as load_study does: only when needed
    study = load_study(exp)
    if study is None:
        return {}, ["no Optuna study in this experiment: optimisation history and importance not drawn"], {}
    images: dict[str, str | None] = {}
    captions: dict[str, str] = {}
    for picture, png in zip(search_pictures(study, METRIC, epochs_at), ("history.png", "parallel.png", "importance.png")):
        images[picture.title] = None if picture.ax is None else save_figure(picture.ax.figure, exp / png)
        captions[picture.title] = picture.note if picture.ax is None else picture.caption
    return images, [], captions


def epochs_of_rounds(history: pd.DataFrame) -> dict[int, float]:
    """round (Optuna's step, training_iteration) -> epoch, where history.csv gives one epoch for it."""
    if not {"training_iteration", "epoch"} <= set(history.columns):
        return {}
    epochs = history.dropna(subset=["training_iteration", "epoch"]).groupby("training_iteration")["epoch"].unique()
    return {int(step): float(e[0]) for step, e in epochs.items() if len(e) == 1}


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
    return save_figure(fig, path)


def plot_per_class(table: pd.DataFrame, path: Path) -> str:
    fig, ax = plt.subplots(figsize=(10, 4))
    x = np.arange(len(table))
    for i, metric in enumerate(("precision", "recall", "f1")):
        ax.bar(x + (i - 1) * 0.27, table[metric], width=0.27, label=metric)
    ax.set_xticks(x, table["class"], rotation=30, ha="right")
    ax.set(ylim=(0, 1), ylabel="score", title="per-class precision / recall / F1 on the test set")
    ax.legend()
    return save_figure(fig, path)


# --------------------------------------------------------------------------- the report

def write_report(exp: Path) -> Path:
    exp = Path(exp)
    if (exp / "kfold.csv").exists():
        from .cv_report import report_kfold
        return report_kfold(exp)
    if not (exp / "best.json").exists() or not (exp / "trials.csv").exists():
        raise UserError(f"{exp}: not a finished search (best.json / trials.csv missing)")
    best = read_json(exp / "best.json")
    spec = read_yaml(exp / "spec.yaml")
    searched = list(spec["space"])
    trials = pd.read_csv(exp / "trials.csv", dtype={"trial_id": str})
    history = pd.read_csv(exp / "history.csv", dtype={"trial_id": str})
    images: dict[str, str] = {}

    ranked = ranked_trials(trials)
    top = [best["best_trial"]] + [t for t in ranked["trial_id"] if t != best["best_trial"]][:TOP_CURVES - 1]
    # the test metrics were computed once, by the final evaluation, and stored in best.json
    classes = [c["class"] for c in best["per_class"]]
    images["Training curves (best and runners-up)"], curves_caption = plot_curves(history, top, exp / "curves.png",
                                                                                  n_classes=len(classes))
    images["Validation accuracy of every trial"] = plot_rungs(history, trials, exp / "trials_epochs.png")
    study_images, notes, captions = optuna_plots(exp, epochs_of_rounds(history))
    captions["Training curves (best and runners-up)"] = curves_caption
    images.update(study_images)

    images["Confusion matrix (test set)"] = plot_confusion(np.array(best["confusion_matrix"]), classes,
                                                           exp / "confusion.png")
    table = pd.DataFrame(best["per_class"])
    write_csv(exp / "per_class.csv", table)
    images["Per-class precision / recall / F1 (test set)"] = plot_per_class(table, exp / "per_class.png")

    gap = overfitting_gap(history, best["best_trial"])
    cfg = best["config"]
    lines = [f"# {best['experiment']}", "",
             f"Command: `{spec.get('command', '?')}`", "",
             f"Search space `{spec['source']}`: {spec.get('description', '')}. "
             f"Data: {cfg['data_dir']}, subset {cfg['subset'] or 'all'} training images "
             f"({cfg['val_fraction']:.0%} held out for validation), {len(classes)} classes, test set "
             f"{int(np.sum(best['confusion_matrix'])):,} images.", "",
             "## Result", "",
             "| | |", "|---|---|",
             f"| best trial | {best['best_trial']} |",
             f"| validation accuracy | {best['val_acc']:.4f} |",
             f"| **test accuracy** | **{best['test_acc']:.4f}** |",
             f"| final model (tested once) | {final_line(final_of(best))} |",
             f"| epochs trained | {best['epochs']:g} |",
             f"| trained in | {best.get('precision_used') or 'not recorded'} "
             f"(precision: {cfg.get('precision', 'auto')}) |",
             f"| overfitting gap (train - val accuracy, last epoch) | {gap:+.4f} |",
             f"| trials | {best['trials']} ({', '.join(f'{v} {k}' for k, v in best['status_counts'].items())}) |",
             f"| time per phase (s) | {', '.join(f'{k} {v:.0f}' for k, v in best.get('phases', {}).items())} |",
             "", "Best configuration: " + ", ".join(f"`{k}={v}`" for k, v in best["best_config"].items()), ""]
    if best.get("selected_by") == "cv":
        from .cv_report import selection_section
        lines += selection_section(exp, best)
    lines += ["## Trials", "", markdown(ranked.head(10)[["trial_id", "status", *searched, "last_val_acc", "epochs",
                                                          "seconds"]]), ""]
    lines += ["## Per class (test set)", "", markdown(table), ""]
    for title, img in images.items():
        shown = [f"![{title}]({img})", ""] if img else []          # None: not drawn, the caption says why
        lines += [f"## {title}", "", *shown] + ([captions[title], ""] if captions.get(title) else [])
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return write_markdown_report(exp, "\n".join(lines))
