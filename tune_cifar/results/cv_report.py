"""The cross-validation's part of a report: the per-configuration intervals (kfold.png), the race
(race.png: accuracy per split per candidate, with the drops), and search --cv-top's story from search
to one test."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..core.finals import final_line, final_of
from .folders import read_yaml
from .pages import markdown, save_figure, write_markdown_report

VERDICT_COLORS = {"best": "C2", "tied with best": "C0"}      # anything else (worse, no statistics): grey


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
            "CV means):", "", markdown(shortlist), ""] + kfold_section(table, f"{Path(cv['table']).parent}/{img}") \
        + race_section(exp / Path(cv["table"]).parent, table, f"{Path(cv['table']).parent}/")


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


def plot_race(exp: Path, table: pd.DataFrame) -> str:
    """Validation accuracy per split per configuration, in the order the splits ran; a cross where
    the race dropped a configuration, the best drawn thick."""
    folds = [c for c in table.columns if c.startswith("fold_")]
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(1, len(folds) + 1)
    best = int(table["config"].iloc[0])
    for i, (_, row) in enumerate(table.sort_values("config").iterrows()):
        acc = row[folds].to_numpy(dtype=float)
        config = int(row["config"])
        ax.plot(x, acc, marker="o", ms=3, color=f"C{i % 10}", lw=2.5 if config == best else 1,
                label=f"config {config}" + (" (best)" if config == best else ""))
        if pd.notna(row["dropped_after"]):
            n = int(row["dropped_after"])
            ax.scatter([n], [acc[n - 1]], marker="x", s=80, color=f"C{i % 10}", zorder=3)
    ax.set_xticks(x)
    ax.set(xlabel="split", ylabel="validation accuracy", title="racing: accuracy per split (x: dropped after it)")
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, exp / "race.png")


def race_section(exp: Path, table: pd.DataFrame, prefix: str = "") -> list[str]:
    """What the race saved and whom it dropped, with its plot (nothing for a kfold.csv without racing
    columns); `prefix`: where the plot lies relative to report.md."""
    if "dropped_after" not in table.columns:
        return []
    splits = len([c for c in table.columns if c.startswith("fold_")])
    ran, full = int(table["splits_done"].sum()), splits * len(table)
    dropped = table[table["dropped_after"].notna()].sort_values("config")
    drops = ", ".join(f"configuration {int(r['config'])} after {int(r['dropped_after'])} splits"
                      for _, r in dropped.iterrows())
    img = plot_race(exp, table)
    return ["### Racing", "", f"{ran} of {full} fold trainings ran (K x R x configurations; "
            f"{full - ran} saved). " + (f"Dropped as significantly worse than the best so far: {drops}. "
                                        if drops else "No configuration was dropped. ")
            + "A dropped configuration keeps its interval and its test over the splits it ran.", "",
            f"![racing]({prefix}{img})", ""]


def report_kfold(exp: Path) -> Path:
    table = pd.read_csv(exp / "kfold.csv", keep_default_na=True).fillna({"reason": ""})
    img = plot_kfold(exp, table)
    spec = read_yaml(exp / "spec.yaml")
    lines = [f"# {exp.name}", "", f"Command: `{spec.get('command', '?')}`", "",
             f"Configurations of `{spec['source']}`; std is the sample standard deviation (ddof=1).", ""]
    lines += kfold_section(table, img) + race_section(exp, table)
    return write_markdown_report(exp, "\n".join(lines))
