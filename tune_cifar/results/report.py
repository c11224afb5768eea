"""Read an experiment folder, write pictures and report.md; compare the training modes of a model.

Only reads what search / kfold / train wrote (CSV, JSON, the Optuna study), so a report can be
re-made at any time: `python -m tune_cifar report EXP`.
"""
from __future__ import annotations

import base64
import html
import math
import mimetypes
from pathlib import Path
from typing import Any

import markdown as markdown_lib  # Markdown -> report.html (`markdown` below is the table helper)
import matplotlib

matplotlib.use("Agg")                                   # files only, never a window
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from markdown.extensions import Extension
from markdown.treeprocessors import Treeprocessor

from ..core.config import UserError
from ..core.finals import final_line
from .folders import ranked_trials, read_json, read_yaml, write_csv, write_png, write_text

TOP_CURVES = 4


def overfitting_gap(history: pd.DataFrame, trial_id: str) -> float:
    """Train minus validation accuracy of a trial's last reported round (NaN if it reported none)."""
    h = history[history["trial_id"] == trial_id]
    return float(h["train_acc"].iloc[-1] - h["val_acc"].iloc[-1]) if len(h) else math.nan


def save_figure(fig, path: Path) -> str:
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
    return save_figure(fig, path)


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


def optuna_plots(exp: Path) -> tuple[dict[str, str], list[str]]:
    """Optuna's own matplotlib plots of what the study holds: optimisation history, parallel
    coordinates, fANOVA importance. ({title: png}, notes on what could not be drawn)."""
    import warnings

    import optuna.visualization.matplotlib as ovm
    study = load_study(exp)
    if study is None:
        return {}, ["no Optuna study in this experiment: optimisation history and importance not drawn"]
    images, notes = {}, []
    for title, plot, png in (("Optimisation history", ovm.plot_optimization_history, "history.png"),
                             ("Parallel coordinates", ovm.plot_parallel_coordinate, "parallel.png"),
                             ("Hyper-parameter importance (fANOVA)", ovm.plot_param_importances, "importance.png")):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")          # Optuna marks its matplotlib backend experimental
                ax = plot(study)
            images[title] = save_figure(ax.figure, exp / png)
        except Exception as e:       # too few finished trials, a single value, ...
            notes.append(f"{title.lower()} not drawn ({type(e).__name__}: {str(e)[:120]})")
            plt.close("all")
    return images, notes


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
    images["Training curves (best and runners-up)"] = plot_curves(history, top, exp / "curves.png")
    images["Validation accuracy of every trial"] = plot_rungs(history, trials, exp / "trials_epochs.png")
    study_images, notes = optuna_plots(exp)
    images.update(study_images)

    # the test metrics were computed once, by the final evaluation, and stored in best.json
    classes = [c["class"] for c in best["per_class"]]
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
        lines += selection_section(exp, best)
    lines += ["## Trials", "", markdown(ranked.head(10)[["trial_id", "status", *searched, "last_val_acc", "epochs",
                                                          "seconds"]]), ""]
    lines += ["## Per class (test set)", "", markdown(table), ""]
    for title, img in images.items():
        lines += [f"## {title}", "", f"![{title}]({img})", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return write_markdown_report(exp, "\n".join(lines))


def selection_section(exp: Path, best: dict[str, Any]) -> list[str]:
    """search --cv-top as one story: shortlist by single validation scores, re-rank by CV, retrain
    the winner on all search images, one test."""
    cv = best["cv"]
    table = pd.read_csv(exp / cv["table"]).fillna({"reason": ""})
    img = plot_kfold(exp / Path(cv["table"]).parent, table)
    shortlist = pd.DataFrame(cv["shortlist"])
    drop = shortlist["search_val_acc"] - shortlist["cv_mean_acc"]
    return ["## Selection: search, then cross-validation, then one test", "",
            f"1. The search ranked {best['trials']} trials by one validation score each. "
            f"2. The {cv['top']} best were cross-validated ({cv['k']}-fold x {cv['repeats']}) on the same images. "
            f"3. The configuration with the highest CV mean (configuration {cv['winner']}, search trial "
            f"{best['best_trial']}) became the final model: {final_line(final_of(best))}"
            + (f", {best['epochs']:g} epochs on all of them. " if final_of(best)["kind"] == "retrain" else ". ")
            + f"4. That model was tested once: **test accuracy {best['test_acc']:.4f}**.", "",
            "Single validation score against cross-validated mean (the winner's curse: the best of many noisy "
            f"scores is optimistic; here the shortlist's scores were on average {drop.mean():+.4f} above their "
            "CV means):", "", markdown(shortlist), ""] + kfold_section(table, f"{Path(cv['table']).parent}/{img}")


def final_of(best: dict[str, Any]) -> dict[str, Any]:
    """best.json's final model; one from before `final` was recorded: the retrained winner of --cv-top,
    else the best trial, without TTA."""
    return best.get("final") or {"kind": "retrain" if best.get("selected_by") == "cv" else "best_trial",
                                 "tta": "none", "n_members": 1}


def markdown(df: pd.DataFrame) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "-" if v != v else f"{v:.4g}"        # NaN: no statistic (the best, or too few folds)
        return str(v)
    rows = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    rows += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join(rows)


# --------------------------------------------------------------------------- kfold

VERDICT_COLORS = {"best": "C2", "tied with best": "C0"}      # anything else (worse, no statistics): grey


def plot_kfold(exp: Path, table: pd.DataFrame) -> str:
    """Mean accuracy per configuration with its 95 % interval as error bars, every split as a dot;
    green: the best, blue: statistically tied with it, grey: worse (or too few splits to tell)."""
    from ..core.stats import standing
    table = table.sort_values("mean_acc", ascending=False)
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(table) + 2), 4))
    x = np.arange(len(table))
    mean = table["mean_acc"].astype(float)
    err = np.vstack([(mean - table["ci_low"]).fillna(0), (table["ci_high"] - mean).fillna(0)]).clip(min=0)
    colors = [VERDICT_COLORS.get(standing(row), "C7") for _, row in table.iterrows()]
    ax.bar(x, mean, yerr=err, capsize=5, color=colors, alpha=0.8)
    folds = [c for c in table.columns if c.startswith("fold_")]
    for i, (_, row) in enumerate(table.iterrows()):
        ax.scatter([i] * len(folds), row[folds].astype(float), color="k", s=10, zorder=3)
    ax.set_xticks(x, [f"config {int(c)}" for c in table["config"]], rotation=30, ha="right")
    values = table[folds + ["ci_low", "ci_high"]].to_numpy(dtype=float)
    lo, hi = (np.nanmin(values), np.nanmax(values)) if np.isfinite(values).any() else (0.0, 1.0)
    k, r = int(table["k"].iloc[0]), int(table["repeats"].iloc[0])
    ax.set(ylabel="validation accuracy", ylim=(max(0, lo - 0.05), min(1, hi + 0.03)),
           title=f"{k}-fold x {r}: mean and 95 % interval (green best, blue tied, grey worse)")
    return save_figure(fig, exp / "kfold.png")


def kfold_section(table: pd.DataFrame, img: str) -> list[str]:
    """The cross-validation table in words: which configurations are tied with the best, and why to
    trust it (the same section serves kfold's report and search --cv-top's)."""
    from ..core.stats import ASSUMPTION, standing
    k, r = int(table["k"].iloc[0]), int(table["repeats"].iloc[0])
    shown = table.assign(verdict=table.apply(standing, axis=1))
    cols = [c for c in shown.columns if not c.startswith("fold_") and c not in ("k", "repeats", "reason")]
    tied = [str(int(c)) for c, v in zip(shown["config"], shown["verdict"]) if v in ("best", "tied with best")]
    return [f"{k}-fold stratified cross-validation repeated {r} time(s): {k * r} splits, the same for every "
            f"configuration. Interval: 95 %; p_holm: paired test against the best, Holm-adjusted.", "",
            f"Statistically tied with the best (p_holm >= 0.05): configuration(s) {', '.join(tied) or '-'}.", "",
            ASSUMPTION, "", markdown(shown[cols]), "", f"![k-fold]({img})", ""]


def report_kfold(exp: Path) -> Path:
    table = pd.read_csv(exp / "kfold.csv", keep_default_na=True).fillna({"reason": ""})
    img = plot_kfold(exp, table)
    spec = read_yaml(exp / "spec.yaml")
    lines = [f"# {exp.name}", "", f"Command: `{spec.get('command', '?')}`", "",
             f"Configurations of `{spec['source']}`; std is the sample standard deviation (ddof=1).", ""]
    lines += kfold_section(table, img)
    return write_markdown_report(exp, "\n".join(lines))


# --------------------------------------------------------------------------- report.html

HTML_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #bbb;padding:3px 8px}
th{background:#f0f0f0}img{max-width:100%}code{background:#f4f4f4;padding:1px 3px}"""


def write_markdown_report(exp: Path, text: str) -> Path:
    """report.md, and beside it report.html: the same content, self-contained (its images embedded)."""
    path = write_text(exp / "report.md", text)
    write_text(exp / "report.html", markdown_to_html(text, exp, title=exp.name))
    return path


def markdown_to_html(text: str, folder: Path, title: str) -> str:
    """Markdown (tables included) -> one HTML page whose local images are base64 data: URIs."""
    body = markdown_lib.markdown(text, extensions=["tables", "fenced_code", EmbedImages(folder)])
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{HTML_STYLE}</style></head>\n<body>\n{body}\n</body></html>\n")


class _EmbedImagesProcessor(Treeprocessor):
    def __init__(self, md, folder: Path):
        super().__init__(md)
        self.folder = folder

    def run(self, root) -> None:
        for img in root.iter("img"):
            src = img.get("src", "")
            path = self.folder / src
            if not src or ":" in src or not path.is_file():          # data:, http(s):, missing: left as they are
                continue
            mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            img.set("src", f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}")


class EmbedImages(Extension):
    """Markdown extension: images named relative to `folder` become data: URIs (a self-contained page)."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = Path(folder)

    def extendMarkdown(self, md) -> None:
        md.treeprocessors.register(_EmbedImagesProcessor(md, self.folder), "embed_images", 0)  # after 'inline'
