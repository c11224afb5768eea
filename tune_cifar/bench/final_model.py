"""`bench --only final_model`: which final model of `search --cv-top` tests best?

`search simple_cnn --quick --cv-top 3 --k 5` once per seed, then four final models of it, each its
own experiment tested once: retrain (the winner retrained on the whole pool: the old default),
bagging (the winner's 5 split models of the cross-validation, softmax averaged), and each of the
two with flip test-time augmentation. The search and cross-validation stages of one seed are run
once (the retrain + no-TTA experiment) and its folder copied before the final stage for the other
three (same seed = same search and CV; retrain + flip reuses the finished retrain.pt, the same
model); each copy then runs its final stage and its one test through `--resume`. Test accuracy
mean +- std per variant and a paired t-test by seed (scipy.stats.ttest_rel) of each against
retrain without TTA.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..results.folders import read_json, write_json
from .parts import Bench

VARIANTS = {"retrain_none": ("retrain", "none"), "retrain_flip": ("retrain", "flip"),
            "bagging_none": ("bagging", "none"), "bagging_flip": ("bagging", "flip")}
BASELINE = "retrain_none"
# How big it runs. full: the command as it is (about 10 minutes per seed on an idle 2-core CPU,
# hours when the machine is shared); quick (bench --quick): the same stages on 1,500 training images,
# 3 trials of 1 epoch (the smallest pool where every fold still has two batches of the space's largest
# batch size, 512, per epoch), and a copy of CIFAR-10 with the first 2,000 test images.
SIZES = {"full": {"flags": {}, "test_images": None, "seeds": [0, 1, 2]},
         "quick": {"flags": {"subset": 1500, "max_epochs": 1, "num_samples": 3}, "test_images": 2000,
                   "seeds": [0, 1, 2]}}
SMALL_TRAIN = 10_000      # training images of the quick copy (the subset is drawn from them)
# the final stage's files: a copy made before it has none of them (bagging needs no retrain.pt either)
FINAL_FILES = ("best.json", "test.json", "best_model.pt", "test_predictions.json", "report.md", "report.html")


def search_args(data_dir: str | None, name: str, seed: int, final: str | None, tta: str | None,
                flags: dict[str, Any]) -> list[str]:
    """The command line of one experiment (spec.yaml records it); without final: --resume."""
    args = ["search", "simple_cnn", "--quick", "--cv-top", "3", "--k", "5", "--seed", str(seed), "--name", name,
            "--no-report", "--no-tensorboard"]
    for key, value in flags.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    args += ["--data-dir", data_dir] if data_dir else []
    return args + (["--final", final, "--tta", tta] if final else ["--resume"])


def run_search(b: Bench, data_dir: str | None, name: str, seed: int, flags: dict[str, Any],
               final: str | None = None, tta: str | None = None) -> dict[str, Any]:
    """`search simple_cnn --quick --cv-top 3 --k 5` through the CLI's own entry; with final=None it is
    resumed (a finished experiment is only read back). Returns its best.json."""
    from ..core.config import UserError
    args = search_args(data_dir, name, seed, final, tta, flags) + ["--results-dir", str(b.work)]
    if b.cli(args) != 0:
        raise UserError(f"bench final_model: `{' '.join(args)}` failed (see above)")
    return read_json(b.work / name / "best.json")


def copy_before_final(base: Path, dest: Path, final: str, tta: str) -> None:
    """The base experiment up to its cross-validation, as a new experiment whose plan declares
    `final` and `tta` (its final stage not run yet)."""
    skip = set(FINAL_FILES) | ({"retrain.pt"} if final == "bagging" else set())
    shutil.copytree(base, dest, ignore=lambda folder, names: [n for n in names if Path(folder) == base and n in skip])
    plan = read_json(dest / "plan.json")
    plan["options"].update(final=final, tta=tta, name=dest.name)
    write_json(dest / "plan.json", plan)


def final_model(b: Bench, quick: bool, seeds: list[int] | None = None) -> dict[str, Any]:
    """`seeds`: a part of the size's seeds (runs of single seeds in parallel share the work folder,
    `bench --work-dir`, and a last run over all of them reads them back)."""
    data_dir, work, cifar = b.data_dir, b.work, b.images
    from scipy import stats
    size = SIZES["quick" if quick else "full"]
    flags, seeds = size["flags"], seeds or size["seeds"]
    if size["test_images"]:
        from .parts import small_cifar
        from ..data.sources import load_images
        folder = work / "cifar10_small"
        if not (folder / "cifar-10-batches-py" / "test_batch").exists():
            small_cifar(cifar if cifar is not None else load_images(data_dir), folder, SMALL_TRAIN,
                        size["test_images"])
        data_dir = str(folder)
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for seed in seeds:
        base = work / f"seed{seed}_{BASELINE}"
        t0 = time.time()
        if (base / "best.json").exists() or (base / "plan.json").exists():
            run_search(b, data_dir, base.name, seed, flags)            # finished (or interrupted): --resume
        else:
            run_search(b, data_dir, base.name, seed, flags, *VARIANTS[BASELINE])
        base_wall = time.time() - t0
        for variant, (final, tta) in VARIANTS.items():
            exp = work / f"seed{seed}_{variant}"
            t0 = time.time()
            if variant != BASELINE:
                if not exp.exists():
                    copy_before_final(base, exp, final, tta)
                run_search(b, data_dir, exp.name, seed, flags)
            best = read_json(exp / "best.json")
            phases = best.get("phases", {})
            runs[variant].append({
                "seed": seed, "experiment": str(exp), "test_acc": best["test_acc"], "test_loss": best.get("test_loss"),
                "cv_mean_acc": best["cv"]["mean_acc"], "cv_winner": best["cv"]["winner"],
                "final": best.get("final") or {"kind": "retrain", "tta": "none", "n_members": 1},
                # the final stage's own time: retrain (retrain variants) + the one test
                "final_stage_s": round(phases.get("retrain", 0.0) + phases.get("test", 0.0), 1),
                "wall_s_this_run": round(time.time() - t0 if variant != BASELINE else base_wall, 1),
                "experiment_wall_s": best.get("wall_s")})
        print("final_model seed {}: ".format(seed) + ", ".join(f"{v} {r[-1]['test_acc']:.4f}" for v, r in runs.items()),
              flush=True)
    table: dict[str, Any] = {}
    base_acc = [r["test_acc"] for r in runs[BASELINE]]
    for variant, rs in runs.items():
        acc = [r["test_acc"] for r in rs]
        row: dict[str, Any] = {"test_acc": {"mean": float(np.mean(acc)),
                                            "std": float(np.std(acc, ddof=1)) if len(acc) > 1 else None},
                               "diff_vs_retrain_none": float(np.mean(np.subtract(acc, base_acc)))}
        if variant != BASELINE and len(acc) > 1:
            row["p_vs_retrain_none"] = float(stats.ttest_rel(acc, base_acc).pvalue)
        table[variant] = row
    winner = max(table, key=lambda v: table[v]["test_acc"]["mean"])
    return {"command": "python -m tune_cifar " + " ".join(search_args(data_dir, "NAME", 0, "FINAL", "TTA", flags)),
            "size": "quick" if quick else "full", "test_images": size["test_images"] or "all", "seeds": seeds, "runs": runs, "table": table, "winner": winner,
            "note": "search and CV once per seed (the retrain_none experiment), its folder copied before the final "
                    "stage for each other variant; retrain_flip reuses the finished retrain.pt"}


def markdown(result: dict[str, Any]) -> list[str]:
    lines = [f"final model of `{result['command']}`, seeds {result['seeds']}, test images: {result['test_images']}", "",
             "| final model | TTA | test acc (mean +- std) | vs retrain, no TTA | p (paired t-test by seed) |",
             "|---" * 5 + "|"]
    for variant, row in result["table"].items():
        final, tta = VARIANTS[variant]
        m, sd = row["test_acc"]["mean"], row["test_acc"]["std"]
        p = row.get("p_vs_retrain_none")
        lines.append(f"| {final} | {tta} | {m:.4f}" + (f" +- {sd:.4f}" if sd is not None else "")
                     + f" | {100 * row['diff_vs_retrain_none']:+.2f} points | {'' if p is None else f'{p:.3g}'} |")
    return lines + ["", f"winner: {result['winner']}", ""]
