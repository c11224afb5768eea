"""`bench --only racing`: what racing over the splits saves, and whether it picks the same winner.

8 candidates (the space's default point and 7 Sobol points, as `kfold --num-samples 8` draws them),
K = 5, simple_cnn, per seed one kfold with racing and one without (`--no-race`), on the same
candidates and the same splits (the seed draws both). Per run: fold trainings, wall time; per seed:
whether racing's winner is full CV's winner, or tied with it in the full-CV table (p_holm >= 0.05).
Target: at least 30 % fewer fold trainings (the ceiling with 3 splits before any drop and the winner
on all 5 is 35 %), and the winner the same or tied in every seed.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from .parts import Bench

CANDIDATES, K = 8, 5
# one run is a few minutes on an idle 2-core CPU (two 1-CPU trials at a time)
SIZES = {"quick": {"subset": 1500, "epochs": 1, "seeds": [0]},
         "full": {"subset": 2000, "epochs": 2, "seeds": [0, 1, 2]}}
CPUS_PER_TRIAL = 1
TARGET_SAVED = 0.30


def kfold_run(b: Bench, name: str, seed: int, subset: int, epochs: int, race: bool) -> dict[str, Any]:
    """`kfold simple_cnn --k 5 --num-samples 8 ... [--no-race] --no-report` through the CLI's own
    entry: its kfold_summary.json, kfold.csv (as records) and wall time."""
    import pandas as pd

    from ..core.config import UserError
    from ..results.folders import read_json
    results = b.work
    args = ["kfold", "simple_cnn", "--k", K, "--num-samples", CANDIDATES, "--subset", subset, "--epochs", epochs,
            "--seed", seed, "--cpus-per-trial", CPUS_PER_TRIAL, "--results-dir", results, "--name", name,
            "--no-report", "--overwrite"]
    args += ["--data-dir", b.data_dir] if b.data_dir else []
    args += [] if race else ["--no-race"]
    t0 = time.time()
    if b.cli([str(a) for a in args]) != 0:
        raise UserError(f"bench racing: `{' '.join(str(a) for a in args)}` failed (see above)")
    wall = round(time.time() - t0, 1)
    summary = read_json(results / name / "kfold_summary.json")
    table = pd.read_csv(results / name / "kfold.csv")
    return {"fold_trainings": summary["fold_trainings"], "fold_trainings_full": summary["fold_trainings_full"],
            "dropped_after": summary["dropped_after"], "winner": int(table.iloc[0]["config"]), "wall_s": wall,
            "table": table[["config", "splits_done", "dropped_after", "mean_acc", "p_holm", "tied_with_best"]]
            .astype(object).where(table.notna(), None).to_dict("records")}


def agreement(raced: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    """Whether racing's winner is full CV's, or tied with it there (p_holm >= 0.05 in the full table)."""
    row = next(r for r in full["table"] if r["config"] == raced["winner"])
    same = raced["winner"] == full["winner"]
    tied = same or (row["p_holm"] is not None and row["p_holm"] >= 0.05)
    return {"same_winner": same, "same_or_tied": bool(tied), "p_holm_in_full": row["p_holm"]}


def racing(b: Bench, quick: bool, checkpoint: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Both variants per seed (their order alternates from seed to seed, so a machine that gets busier
    during the run does not always slow the same one). `checkpoint` gets the result so far after
    every run (the bench's JSON is kept up to date: a long run cut short keeps its finished seeds)."""
    z = SIZES["quick" if quick else "full"]
    out: dict[str, Any] = {"space": "simple_cnn", "candidates": CANDIDATES, "k": K, **z,
                           "cpus_per_trial": CPUS_PER_TRIAL, "runs": [], "partial": {}}
    for i, seed in enumerate(z["seeds"]):
        runs = {}
        for race in ((True, False) if i % 2 == 0 else (False, True)):
            name = f"race_{seed}" if race else f"full_{seed}"
            runs[race] = kfold_run(b, name, seed, z["subset"], z["epochs"], race)
            print(f"bench racing seed {seed} {'race' if race else 'no race'}: {runs[race]['fold_trainings']} of "
                  f"{runs[race]['fold_trainings_full']} fold trainings, {runs[race]['wall_s']} s", flush=True)
            out["partial"] = {"seed": seed, **{("race" if r else "no_race"): v for r, v in runs.items()}}
            if checkpoint is not None:
                checkpoint(out)
        out["partial"] = {}
        out["runs"].append({"seed": seed, "race": runs[True], "no_race": runs[False],
                            **agreement(runs[True], runs[False])})
        out["summary"] = summarise(out["runs"])
        if checkpoint is not None:
            checkpoint(out)
    return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    raced = sum(r["race"]["fold_trainings"] for r in runs)
    full = sum(r["no_race"]["fold_trainings"] for r in runs)
    saved = 1 - raced / full
    same = all(r["same_or_tied"] for r in runs)
    return {"seeds_run": len(runs), "fold_trainings_race": raced, "fold_trainings_no_race": full,
            "saved": round(saved, 3), "wall_ratio": round(sum(r["race"]["wall_s"] for r in runs)
                                                          / sum(r["no_race"]["wall_s"] for r in runs), 3),
            "winner_same_or_tied_every_seed": same,
            "target": f">= {TARGET_SAVED:.0%} fewer fold trainings, winner the same or tied in every seed",
            "pass": bool(saved >= TARGET_SAVED and same)}


def racing_markdown(r: dict[str, Any]) -> list[str]:
    lines = [f"racing: {r['space']}, {r['candidates']} candidates, K = {r['k']}, --subset {r['subset']}, "
             f"--epochs {r['epochs']}, seeds {[x['seed'] for x in r['runs']]}", "",
             "| seed | fold trainings race / no race | saved | wall s race / no race | dropped (config: after split) "
             "| winner race / no race | same or tied (p_holm in full CV) |", "|---" * 7 + "|"]
    for x in r["runs"]:
        a, b = x["race"], x["no_race"]
        drops = ", ".join(f"{c}: {n}" for c, n in sorted(a["dropped_after"].items(), key=lambda kv: int(kv[0])))
        p = x["p_holm_in_full"]
        lines.append(f"| {x['seed']} | {a['fold_trainings']} / {b['fold_trainings']} | "
                     f"{1 - a['fold_trainings'] / b['fold_trainings']:.0%} | {a['wall_s']:.0f} / {b['wall_s']:.0f} | "
                     f"{drops or '-'} | {a['winner']} / {b['winner']} | "
                     f"{'yes' if x['same_or_tied'] else 'no'}{'' if p is None else f' ({p:.3f})'} |")
    s = r.get("summary")
    if s:
        lines += ["", f"total: {s['fold_trainings_race']} / {s['fold_trainings_no_race']} fold trainings "
                  f"({s['saved']:.0%} saved), wall time ratio race / no race {s['wall_ratio']:.2f}; "
                  f"winner same or tied in every seed: {s['winner_same_or_tied_every_seed']}; target "
                  f"({s['target']}): {'pass' if s['pass'] else 'FAIL'}"]
    return lines + [""]
