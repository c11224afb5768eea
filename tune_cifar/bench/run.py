"""`bench`: what a GPU-hour (or a CPU-hour) buys, measured as ratios within one run.

P1  training images/s per model x mode: synthetic input already on the device vs the real input
    pipeline (device-resident uint8 + crop/flip/resize/normalise); ratio real / synthetic.
    Frozen mode is timed as what it costs: the backbone's forward pass that features.py caches.
P2  a 16-trial ASHA search of simple_cnn_scratch through Ray Tune vs a plain loop training the same
    configurations for the same rounds; ratio search wall / loop wall (Ray start-up included).
P3  the same search with one trial per device vs several sharing it; trials-per-hour ratio.
P4  VGG16 224 px full fine-tuning images/s (P1's row).
P5  a vgg16_frozen search of 32 trials x 10 epochs: wall time.
cpu_budget  `search simple_cnn --time-budget 900` on the full data set: trials and test accuracy.
search_quality  equal wall-clock budget, same data, several seeds: (a) TPE + ASHA with the truthful
    study (the default), (b) TPE + ASHA with Ray's untruthful COMPLETE feedback, (c) random search +
    ASHA (Ray Tune's default searcher), (d) Optuna alone (TPE + SuccessiveHalvingPruner, the same
    training code, no Ray); mean +- std over seeds and a paired t-test by seed of (a) against each.
rungs  16 configurations trained to the end with ASHA off: Spearman rank correlation between the
    validation accuracy at each round (a possible rung) and at the end.

On a CPU the big scenarios run scaled down (subset, resolution, steps); every row says what it ran.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..core.config import TrainConfig, UserError, value_from_csv
from ..results.folders import write_json, write_text

SCENARIOS = ("p1", "p2", "p3", "p4", "p5", "cpu_budget", "search_quality", "rungs", "final_model")
MODES = [("simple_cnn", "scratch"), ("alexnet", "scratch"), ("alexnet", "frozen"), ("alexnet", "full"),
         ("vgg16", "scratch"), ("vgg16", "frozen"), ("vgg16", "full"),
         ("resnet18", "scratch"), ("resnet18", "frozen"), ("resnet18", "full")]


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def batch_for(model: str, res: int, dev: torch.device) -> int:
    if dev.type == "cuda":
        return 512 if res <= 64 else 128
    return 256 if res <= 32 else (64 if res <= 64 else 16)


def throughput(model_name: str, mode: str, dev: torch.device, cifar, steps: int, real: bool,
               resolution: int | None = None, batch: int | None = None, warmup: int = 2,
               compile_backend: str | None = None) -> float:
    """Images/s of training steps (frozen: backbone forward passes) at the model's resolution (or
    `resolution`), after `warmup` untimed steps; `compile_backend`: the model through torch.compile
    with that backend (its compilation happens in the warm-up)."""
    from ..data.store import DeviceSplit
    from ..training.fit import Runtime, make_optimizer
    from ..training.models import architecture, split_frozen

    cfg = TrainConfig(model=model_name, mode=mode, device=str(dev), width=32 if model_name == "simple_cnn" else 64,
                      resolution=resolution)
    rt = Runtime.of(cfg)
    bs = batch or batch_for(model_name, rt.resolution, dev)
    model = architecture(model_name, mode, 10, cfg.width).to(dev)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    frozen = mode == "frozen"
    if frozen:
        model, _ = split_frozen(model, model_name)
        model.eval()
    opt = make_optimizer(cfg, list(model.parameters()), dev)
    if compile_backend:
        model = torch.compile(model, backend=compile_backend)
    gen = torch.Generator().manual_seed(0)
    split = DeviceSplit(cifar.train_x[: bs * (steps + warmup)], cifar.train_y[: bs * (steps + warmup)], dev)
    fixed = torch.randn(bs, 3, rt.resolution, rt.resolution, device=dev)
    if rt.channels_last:
        fixed = fixed.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (bs,), device=dev)

    def batches():
        if real:
            yield from split.batches(bs, rt.resolution, "flip" if frozen else "crop_flip", gen,
                                     torch.randperm(len(split), generator=gen), channels_last=rt.channels_last)
        else:
            while True:
                yield fixed, labels

    done, t0 = 0, None
    for i, (x, y) in enumerate(batches()):
        if i == warmup:                              # warm-up steps (cuDNN autotuning, allocator, compile)
            _sync(dev)
            t0 = time.perf_counter()
        if frozen:
            with torch.no_grad(), rt.autocast():
                model(x)
        else:
            with rt.autocast():
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if i >= warmup:
            done += len(y)
        if i == steps + warmup - 1:
            break
    _sync(dev)
    return done / (time.perf_counter() - t0)


def bench_p1(dev: torch.device, cifar, quick: bool) -> list[dict[str, Any]]:
    rows = []
    for model, mode in MODES:
        from ..core.config import resolve_resolution
        res = resolve_resolution(model, mode, None)
        steps = 3 if (dev.type == "cpu" and res > 64) else (5 if quick else 20)
        syn = throughput(model, mode, dev, cifar, steps, real=False)
        real = throughput(model, mode, dev, cifar, steps, real=True)
        rows.append({"model": model, "mode": mode, "resolution": res, "batch": batch_for(model, res, dev),
                     "synthetic_img_s": round(syn, 1), "pipeline_img_s": round(real, 1), "P1": round(real / syn, 3)})
        print(f"P1 {model:10s} {mode:8s} {res:4d}px  synthetic {syn:9.1f} img/s  pipeline {real:9.1f} img/s  "
              f"ratio {real / syn:.3f}", flush=True)
    return rows


def _search(space: str, results: Path, name: str, data_dir: str | None, **flags: Any) -> dict[str, Any]:
    """A search as `search SPACE --no-report ...flags` would run it (spec.yaml records that command);
    returns its best.json."""
    from ..tuning.runner import run
    from ..results.folders import command_line
    from ..commands.search import SearchOptions, plan_search
    args = ["search", space, "--results-dir", results, "--name", name, "--no-report"]
    args += ["--data-dir", data_dir] if data_dir else []
    for key, value in flags.items():
        if value is not None:
            args += [f"--{key.replace('_', '-')}", value]
    opts = SearchOptions(results_dir=Path(results), name=name, data_dir=data_dir, command=command_line(args),
                         **{k: v for k, v in flags.items() if v is not None})
    return run(plan_search(space, opts))


def plain_loop(exp: Path, subset: int | None) -> float:
    """Train every configuration of a finished search for the rounds it ran there, no Ray."""
    import pandas as pd

    from ..data.cache import device_data
    from ..training.fit import fit

    best = json.loads((exp / "best.json").read_text())
    base = TrainConfig.from_dict(best["config"])
    trials = pd.read_csv(exp / "trials.csv").sort_values("trial")
    searched = list(best["best_config"])

    t0 = time.perf_counter()
    data = device_data(base.replace(subset=subset))
    for _, t in trials.iterrows():
        if t["rounds"] > 0:
            fit(base.replace(**{k: value_from_csv(k, t[k]) for k in searched}), data, max_rounds=int(t["rounds"]))
    return time.perf_counter() - t0


def bench_p2_p3(dev: torch.device, data_dir: str | None, quick: bool, work: Path, only: set[str]) -> dict:
    subset = 5000 if quick else 20_000
    epochs = 2 if quick else 4
    out: dict[str, Any] = {"subset": subset, "max_epochs": epochs, "trials": 16}
    if "p2" in only:
        s = _search("simple_cnn", work, "p2", data_dir, num_samples=16, max_epochs=epochs, subset=subset)
        search_s = s["phases"]["ray_start"] + s["phases"]["search"]
        loop_s = plain_loop(work / "p2", subset)
        out.update(search_s=round(search_s, 1), plain_loop_s=round(loop_s, 1), P2=round(search_s / loop_s, 3),
                   search_test_acc=s["test_acc"])
        print(f"P2 search {search_s:.1f}s vs plain loop {loop_s:.1f}s: ratio {search_s / loop_s:.3f}", flush=True)
    if "p3" in only:
        if dev.type == "cuda":
            one, shared = {"gpus_per_trial": 1.0}, {"gpus_per_trial": 0.25}
        else:
            cores = os.cpu_count() or 2
            one, shared = {"cpus_per_trial": cores}, {"cpus_per_trial": max(1, cores // 4) if cores >= 4 else 1}
        rates = {}
        for label, flags in (("one_per_device", one), ("shared", shared)):
            s = _search("simple_cnn", work, f"p3_{label}", data_dir, num_samples=8, max_epochs=epochs, subset=subset,
                        **flags)
            rates[label] = 8 / (s["phases"]["search"] / 3600)
        out.update(p3_flags={"one": one, "shared": shared},
                   trials_per_hour={k: round(v, 1) for k, v in rates.items()},
                   P3=round(rates["shared"] / rates["one_per_device"], 3))
        print(f"P3 trials/hour shared {rates['shared']:.0f} vs one per device {rates['one_per_device']:.0f}: "
              f"{out['P3']:.2f}x", flush=True)
    return out


def bench_p5(dev: torch.device, data_dir: str | None, quick: bool, work: Path) -> dict:
    import torchvision
    weights = work / "vgg16_random.pth"          # offline stand-in for the ImageNet file: same shapes, same speed
    if not weights.exists():
        torch.save(torchvision.models.vgg16().state_dict(), weights)
    gpu = dev.type == "cuda"
    subset = None if gpu and not quick else 2000
    flags = dict(num_samples=32, max_epochs=10, weights=str(weights), subset=subset)
    t0 = time.perf_counter()
    if not gpu:                                  # 224 px through VGG16 on a CPU: scaled down, and said so
        from ..core.spaces import load_space
        spec = load_space("vgg16_frozen")
        path = work / "vgg16_frozen_cpu.yaml"
        import yaml
        raw = yaml.safe_load(open(spec.source))
        raw["resolution"] = 64
        path.write_text(yaml.safe_dump(raw))
        s = _search(str(path), work, "p5", data_dir, **flags)
    else:
        s = _search("vgg16_frozen", work, "p5", data_dir, **flags)
    wall = time.perf_counter() - t0
    out = {"wall_s": round(wall, 1), "trials": s["trials"], "test_acc": s["test_acc"], "subset": subset,
           "resolution": 224 if gpu else 64, "phases": s["phases"]}
    print(f"P5 vgg16_frozen 32 trials x 10 epochs: {wall:.0f}s (subset {subset}, {out['resolution']} px)", flush=True)
    return out


def bench_cpu_budget(data_dir: str | None, work: Path, budget: int = 900) -> dict:
    t0 = time.time()
    cmd = [sys.executable, "-m", "tune_cifar", "search", "simple_cnn", "--time-budget", str(budget),
           "--results-dir", str(work), "--name", "cpu_budget"] + (["--data-dir", data_dir] if data_dir else [])
    subprocess.run(cmd, check=True)
    best = json.loads((work / "cpu_budget" / "best.json").read_text())
    return {"command": " ".join(cmd[1:]), "wall_s": round(time.time() - t0, 1), "budget_s": budget,
            "trials": best["trials"], "configurations": _ran(work / "cpu_budget"),
            "status_counts": best["status_counts"], "test_acc": best["test_acc"],
            "val_acc": best["val_acc"], "phases": best["phases"], "best_config": best["best_config"]}


QUALITY_VARIANTS = {"a_tpe_truthful": {"searcher": "tpe"},
                    "b_tpe_complete": {"searcher": "tpe", "study_feedback": "complete"},
                    "c_random_asha": {"searcher": "random"}}


def optuna_alone(space: str, data_dir: str | None, subset: int, seed: int, budget_s: float) -> dict[str, Any]:
    """Variant (d): Optuna's own loop (ask/tell), TPE + SuccessiveHalvingPruner at the space's rungs,
    the same fit() and data, no Ray; stops proposing when the clock says so and tests its best trial."""
    import optuna

    from ..data.cache import device_data
    from ..data.sources import resolve_data_dir
    from ..tuning.runner import time_reserve
    from ..training.fit import evaluate_test, fit
    from ..core.spaces import asha_rounds, load_space
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t0 = time.time()
    spec = load_space(space)
    base = spec.base.replace(data_dir=resolve_data_dir(data_dir, False), subset=subset, seed=seed,
                             threads=os.cpu_count())
    max_t, grace = asha_rounds(spec.budget, base.evals_per_epoch)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=optuna.pruners.SuccessiveHalvingPruner(
                                    min_resource=grace, reduction_factor=int(spec.budget.reduction_factor)))
    study.enqueue_trial(spec.default_point())
    data = device_data(base)
    deadline = t0 + budget_s - time_reserve(budget_s)
    best: tuple[float, Any, TrainConfig] | None = None
    trials = 0
    while time.time() < deadline:
        trial = study.ask(spec.optuna_space())
        cfg = base.replace(**trial.params)

        def on_round(record, _state, trial=trial):
            trial.report(record["val_acc"], record["round"])
            return trial.should_prune() or time.time() > deadline
        result = fit(cfg, data, on_round=on_round)
        trials += 1
        last = result.last.get("val_acc", float("nan"))
        if result.status in ("completed", "early_stopped", "diverged") and len(result.history) >= max_t:
            study.tell(trial, last)
        elif result.status == "diverged":
            study.tell(trial, 0.0)
        else:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        if last == last and (best is None or last > best[0]):
            best = (last, result.model, cfg)
    test_acc = evaluate_test(best[1], best[2], data)["test_acc"]
    return {"trials": trials, "configurations": trials,      # each asked trial trains at least one round
            "best_val_acc": best[0], "test_acc": test_acc, "wall_s": round(time.time() - t0, 1)}


def bench_search_quality(data_dir: str | None, quick: bool, work: Path) -> dict[str, Any]:
    """Each variant searches simple_cnn for the same wall-clock budget on the same stratified subset,
    once per seed; (a) is compared with each other variant by a paired t-test over the seeds."""
    from scipy import stats
    subset, budget, seeds = (3000, 60, [0, 1]) if quick else (5000, 150, [0, 1, 2])
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in [*QUALITY_VARIANTS, "d_optuna_alone"]}
    for seed in seeds:
        for variant, flags in QUALITY_VARIANTS.items():
            t0 = time.time()
            s = _search("simple_cnn", work, f"q_{variant}_{seed}", data_dir, subset=subset, time_budget=budget,
                        seed=seed, **flags)
            runs[variant].append({"seed": seed, "trials": s["trials"],
                                  "configurations": _ran(work / f"q_{variant}_{seed}"), "best_val_acc": s["val_acc"],
                                  "test_acc": s["test_acc"], "wall_s": round(time.time() - t0, 1)})
        runs["d_optuna_alone"].append({"seed": seed, **optuna_alone("simple_cnn", data_dir, subset, seed, budget)})
        print(f"search_quality seed {seed}: " + ", ".join(f"{v} {r[-1]['test_acc']:.4f}" for v, r in runs.items()),
              flush=True)
    table = {}
    for variant, rs in runs.items():
        row = {}
        for key in ("configurations", "best_val_acc", "test_acc"):
            values = [r[key] for r in rs]
            row[key] = {"mean": float(np.mean(values)),
                        "std": float(np.std(values, ddof=1)) if len(values) > 1 else None}
        if variant != "a_tpe_truthful":
            for key in ("best_val_acc", "test_acc"):
                a = [r[key] for r in runs["a_tpe_truthful"]]
                b = [r[key] for r in rs]
                row[f"p_{key}_vs_a"] = float(stats.ttest_rel(a, b).pvalue) if len(a) > 1 else None
        table[variant] = row
    return {"subset": subset, "budget_s": budget, "seeds": seeds, "runs": runs, "table": table}


def bench_rungs(data_dir: str | None, quick: bool, work: Path) -> dict[str, Any]:
    """Where can ASHA judge? Every configuration runs to the end (grace period = max epochs: ASHA never
    stops one); per round, Spearman's rank correlation of validation accuracy with the final one.
    The rounds are quarter epochs whatever the space evaluates at: every place a rung could go."""
    import pandas as pd
    from scipy import stats

    from ..core.spaces import load_space
    subset, n = (3000, 6) if quick else (10000, 16)
    max_epochs = load_space("simple_cnn").budget.max_epochs
    s = _search(_space_at("simple_cnn", None, work, evals_per_epoch=4), work, "rungs", data_dir, subset=subset,
                num_samples=n, grace_period=max_epochs, seed=0)
    history = pd.read_csv(work / "rungs" / "history.csv", dtype={"trial_id": str})
    acc = history.pivot(index="trial_id", columns="round", values="val_acc")
    final = acc[acc.columns.max()]
    rows = []
    for r in acc.columns:
        rho = stats.spearmanr(acc[r], final, nan_policy="omit").statistic
        rows.append({"round": int(r), "epoch": float(history.loc[history["round"] == r, "epoch"].iloc[0]),
                     "spearman_vs_final": round(float(rho), 3),
                     "median_val_acc": round(float(acc[r].median()), 4)})
        print(f"rungs: round {int(r):2d} epoch {rows[-1]['epoch']:.2f}: Spearman {rho:+.3f}, "
              f"median val_acc {rows[-1]['median_val_acc']:.3f}", flush=True)
    return {"subset": subset, "configurations": n, "trials": s["trials"], "max_epochs": max_epochs,
            "evals_per_epoch": 4, "per_round": rows}


# --------------------------------------------------------------------------- bench --accept

@dataclass(frozen=True)
class Sizes:
    """How big each part of `bench --accept` runs. The cuda sizes are the acceptance sizes of
    BENCHMARKS.md; the others are scaled down (and `note` says how) so the same code runs anywhere."""
    note: str
    p1_steps: int                       # timed steps per P1 row (after p1_warmup untimed ones)
    p1_warmup: int
    p1_batch: tuple[int, int] | None    # (batch up to 64 px, batch above) or None: batch_for()
    p1_max_res: int | None              # 224 px rows run at this resolution instead (None: as they are)
    p2_subset: int | None
    p2_epochs: int
    p2_trials: int
    p3_subset: int | None
    p3_epochs: int
    p3_trials: int
    p3_budget: float | None             # --time-budget of each P3 search (bounds the part)
    p4_res: int
    p4_batch: int
    p4_steps: int
    p4_backend: str                     # torch.compile backend of the P4 compile row
    p5_subset: int | None
    p5_res: int
    p5_trials: int
    p5_epochs: int
    p5_budget: float | None
    p6: dict[str, Any]                  # flags of the simple_cnn accuracy search
    p7: dict[str, Any]                  # flags of the resnet18_scratch accuracy search
    pretrained: tuple[str, dict[str, Any]]   # (space, flags) of the pretrained run, when weights are present
    small_data: tuple[int, int] | None = None   # (training, test) images of a CIFAR-10 copy the runs read instead


SIZES = {
    "cuda": Sizes(
        note="acceptance sizes (BENCHMARKS.md); every search bounded by a --time-budget: <= 35 min in all",
        p1_steps=20, p1_warmup=3, p1_batch=None, p1_max_res=None,
        p2_subset=20_000, p2_epochs=4, p2_trials=16,
        p3_subset=None, p3_epochs=2, p3_trials=16, p3_budget=120,
        p4_res=224, p4_batch=128, p4_steps=30, p4_backend="inductor",
        p5_subset=None, p5_res=224, p5_trials=32, p5_epochs=10, p5_budget=240,
        p6=dict(max_epochs=16, time_budget=300), p7=dict(time_budget=600),
        pretrained=("resnet18_full", dict(time_budget=180))),
    "cuda-quick": Sizes(
        note="--quick on a GPU: subsets of 4,000 images (a copy of CIFAR-10 that small fits a device call), few "
             "trials, one Ray session shared by the searches (a smoke run, not the acceptance sizes)",
        p1_steps=5, p1_warmup=2, p1_batch=None, p1_max_res=None,
        p2_subset=4000, p2_epochs=2, p2_trials=16,
        p3_subset=4000, p3_epochs=2, p3_trials=8, p3_budget=60,
        p4_res=224, p4_batch=64, p4_steps=10, p4_backend="inductor",
        p5_subset=4000, p5_res=224, p5_trials=8, p5_epochs=2, p5_budget=90,
        p6=dict(subset=4000, max_epochs=2, num_samples=4), p7=dict(subset=4000, max_epochs=2, num_samples=2),
        pretrained=("resnet18_full", dict(subset=4000, max_epochs=1, num_samples=2))),
    "cpu": Sizes(
        note="CPU: 224 px rows and searches scaled down (64 px, subsets); the simple_cnn accuracy part is the "
             "15-minute CPU search of BENCHMARKS.md",
        p1_steps=3, p1_warmup=2, p1_batch=(64, 16), p1_max_res=None,
        p2_subset=20_000, p2_epochs=4, p2_trials=16,
        p3_subset=10_000, p3_epochs=2, p3_trials=8, p3_budget=600,
        p4_res=224, p4_batch=16, p4_steps=3, p4_backend="inductor",
        p5_subset=2000, p5_res=64, p5_trials=32, p5_epochs=10, p5_budget=600,
        p6=dict(time_budget=900), p7=dict(subset=5000, max_epochs=2, num_samples=4),
        pretrained=("resnet18_frozen", dict(subset=2000, max_epochs=2, num_samples=4, set_resolution=64))),
    "cpu-quick": Sizes(
        note="--quick on a CPU: every part scaled down to run in minutes on 2 cores (a copy of CIFAR-10 with "
             "3,000 training and 1,000 test images; 224 px rows at each model's smallest resolution, batches of 8; "
             "subsets of 1,000-2,500 images, 1-2 epochs, 1-8 trials; one Ray session shared by the searches, so P2 "
             "leaves out Ray's start; torch.compile with the aot_eager backend: no C++ code generation); the "
             "numbers show that the code runs, not the targets",
        p1_steps=2, p1_warmup=1, p1_batch=(8, 8), p1_max_res=32,
        p2_subset=2500, p2_epochs=1, p2_trials=8,
        p3_subset=2500, p3_epochs=1, p3_trials=4, p3_budget=None,
        p4_res=32, p4_batch=8, p4_steps=2, p4_backend="aot_eager",
        p5_subset=1000, p5_res=32, p5_trials=4, p5_epochs=2, p5_budget=None,
        p6=dict(subset=2500, max_epochs=1, num_samples=2), p7=dict(subset=1000, max_epochs=1, num_samples=1),
        pretrained=("resnet18_frozen", dict(subset=1000, max_epochs=1, num_samples=1, set_resolution=32)),
        small_data=(3000, 1000)),
}

# The targets `bench --accept` checks (BENCHMARKS.md): (what, unit, comparison, threshold, where it applies).
TARGETS: dict[str, tuple[str, str, str, float | None, str]] = {
    "P1": ("input pipeline vs synthetic input, lowest img/s ratio over every model x mode", "ratio", ">=", 0.95,
           "cuda"),
    "P2": ("ASHA search (16 trials) vs a plain loop training the same configurations for the same rounds: "
           "wall-time ratio", "ratio",
           "<=", 1.25, "any"),
    "P3": ("trials/hour sharing the device (0.25 GPU per trial) vs one trial per device (1.0)", "ratio", ">=", 2.5,
           "cuda"),
    "P4": ("VGG16 full fine-tuning (224 px), eager: training img/s", "img/s", ">=", 4500, "cuda"),
    "P4c": ("VGG16 full fine-tuning (224 px), torch.compile: training img/s", "img/s", ">=", 4500, "cuda"),
    "P5": ("vgg16_frozen search (32 trials x 10 epochs, 224 px): wall time", "s", "<=", 120, "cuda"),
    "P6": ("simple_cnn search on CIFAR-10 (up to 16 epochs): test accuracy", "acc", ">=", 0.85, "cuda"),
    "P6cpu": ("simple_cnn search, --time-budget 900 on the CPU: test accuracy (and >= 16 configurations)", "acc", ">=",
              0.83, "cpu"),
    "P7": ("resnet18_scratch search on CIFAR-10 within 10 minutes: test accuracy", "acc", ">=", 0.94, "cuda"),
    "pretrained": ("pretrained backbone search (weights present): test accuracy", "acc", "", None, "any"),
}


def verdict(part: str, value: float | None, dev: torch.device, extra_ok: bool = True) -> str:
    """pass | fail | n/a on CPU (a GPU target on a CPU run) | reported (no target set)."""
    _, _, op, threshold, applies = TARGETS[part]
    if threshold is None:
        return "reported"
    if applies == "cuda" and dev.type != "cuda":
        return "n/a on CPU"
    if applies == "cpu" and dev.type != "cpu":
        return "n/a on GPU"
    if value is None:
        return "fail"
    ok = value >= threshold if op == ">=" else value <= threshold
    return "pass" if ok and extra_ok else "fail"


def target_text(part: str) -> str:
    _, unit, op, threshold, applies = TARGETS[part]
    if threshold is None:
        return "none set (reported)"
    where = {"cuda": " on an H100", "cpu": " on the CPU", "any": ""}[applies]
    number = f"{threshold:,.0f}" if threshold >= 100 else f"{threshold:g}"
    return f"{op} {number}{'' if unit in ('ratio', 'acc') else ' ' + unit}{where}"


def _flags(flags: dict[str, Any]) -> dict[str, Any]:
    """Search flags of a Sizes entry; set_resolution=R becomes a scaled copy of the space (below)."""
    return {k: v for k, v in flags.items() if k != "set_resolution"}


def _space_at(space: str, resolution: int | None, work: Path, **fixed: Any) -> str:
    """The space's name, or a copy of its file at another resolution and/or with other `fixed`
    settings (scaled-down runs say so)."""
    if resolution is None and not fixed:
        return space
    import yaml

    from ..core.spaces import load_space
    raw = yaml.safe_load(open(load_space(space).source))
    tags = []
    if resolution is not None:
        raw["resolution"] = resolution
        tags.append(f"{resolution}px")
    raw.setdefault("fixed", {}).update(fixed)
    tags += [f"{k}_{v}" for k, v in fixed.items()]
    path = work / f"{space}_{'_'.join(tags)}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _ran(exp: Path) -> int:
    """Trials of a finished search that ran at least one round."""
    import pandas as pd
    trials = pd.read_csv(exp / "trials.csv")
    return int((trials["rounds"] > 0).sum())


def accept_p1(dev: torch.device, cifar, z: Sizes) -> tuple[float, dict[str, Any]]:
    from ..core.config import min_resolution, resolve_resolution
    rows = []
    for model, mode in MODES:
        res = resolve_resolution(model, mode, None)
        if z.p1_max_res is not None and res > z.p1_max_res:
            res = max(z.p1_max_res, min_resolution(model))
        bs = (z.p1_batch[0] if res <= 64 else z.p1_batch[1]) if z.p1_batch else batch_for(model, res, dev)
        kw = dict(resolution=res, batch=bs, warmup=z.p1_warmup)
        syn = throughput(model, mode, dev, cifar, z.p1_steps, real=False, **kw)
        real = throughput(model, mode, dev, cifar, z.p1_steps, real=True, **kw)
        rows.append({"model": model, "mode": mode, "resolution": res, "batch": bs, "synthetic_img_s": round(syn, 1),
                     "pipeline_img_s": round(real, 1), "P1": round(real / syn, 3)})
        print(f"P1 {model:10s} {mode:8s} {res:4d}px  synthetic {syn:9.1f} img/s  pipeline {real:9.1f} img/s  "
              f"ratio {real / syn:.3f}", flush=True)
    return min(r["P1"] for r in rows), {"rows": rows}


def accept_p2(dev: torch.device, data_dir: str | None, z: Sizes, work: Path) -> tuple[float, dict[str, Any]]:
    one = {"gpus_per_trial": 1.0} if dev.type == "cuda" else {"cpus_per_trial": os.cpu_count() or 1}
    s = _search("simple_cnn", work, "p2", data_dir, num_samples=z.p2_trials, max_epochs=z.p2_epochs,
                subset=z.p2_subset, **one)
    search_s = s["phases"]["ray_start"] + s["phases"]["search"]
    loop_s = plain_loop(work / "p2", z.p2_subset)
    print(f"P2 search {search_s:.1f}s vs plain loop {loop_s:.1f}s: ratio {search_s / loop_s:.3f}", flush=True)
    return search_s / loop_s, {"search_s": round(search_s, 1), "plain_loop_s": round(loop_s, 1), "flags": one,
                               "trials": s["trials"], "subset": z.p2_subset, "max_epochs": z.p2_epochs}


def accept_p3(dev: torch.device, data_dir: str | None, z: Sizes, work: Path) -> tuple[float, dict[str, Any]]:
    if dev.type == "cuda":
        one, shared = {"gpus_per_trial": 1.0}, {"gpus_per_trial": 0.25}
    else:                                        # the CPU's cores are the shared device
        cores = os.cpu_count() or 2
        one, shared = {"cpus_per_trial": cores}, {"cpus_per_trial": max(1, cores // 4)}
    rates, ran = {}, {}
    for label, flags in (("one_per_device", one), ("shared", shared)):
        name = f"p3_{label}"
        s = _search("simple_cnn", work, name, data_dir, num_samples=z.p3_trials, max_epochs=z.p3_epochs,
                    subset=z.p3_subset, time_budget=z.p3_budget, **flags)
        ran[label] = _ran(work / name)
        rates[label] = ran[label] / (s["phases"]["search"] / 3600)
    ratio = rates["shared"] / rates["one_per_device"]
    print(f"P3 trials/hour shared {rates['shared']:.0f} vs one per device {rates['one_per_device']:.0f}: "
          f"{ratio:.2f}x", flush=True)
    return ratio, {"flags": {"one": one, "shared": shared}, "trials_run": ran,
                   "trials_per_hour": {k: round(v, 1) for k, v in rates.items()}}


def accept_p4(dev: torch.device, cifar, z: Sizes, backend: str | None = None) -> tuple[float, dict[str, Any]]:
    """VGG16 full fine-tuning img/s at P4's sizes: eager, or through torch.compile with `backend`
    (compiled during the warm-up steps, which are not timed)."""
    rate = throughput("vgg16", "full", dev, cifar, z.p4_steps, real=False, resolution=z.p4_res, batch=z.p4_batch,
                      warmup=3, compile_backend=backend)
    print(f"P4 VGG16 {z.p4_res}px full fine-tuning, {f'torch.compile ({backend})' if backend else 'eager'}: "
          f"{rate:.1f} img/s", flush=True)
    return rate, {"resolution": z.p4_res, "batch": z.p4_batch, "steps": z.p4_steps, "compile_backend": backend}


def pretrained_weights(model: str) -> Path | None:
    """torchvision's cached ImageNet file of `model`, when this machine has it (never downloaded here)."""
    from ..training.models import hub_cache_file
    path = hub_cache_file(model)
    return path if path.is_file() else None


def accept_p5(dev: torch.device, data_dir: str | None, z: Sizes, work: Path) -> tuple[float, dict[str, Any]]:
    import torchvision
    weights = pretrained_weights("vgg16")
    imagenet = weights is not None
    if weights is None:                          # same shapes, same speed: the time does not depend on values
        weights = work / "vgg16_random.pth"
        torch.save(torchvision.models.vgg16().state_dict(), weights)
    space = _space_at("vgg16_frozen", None if z.p5_res == 224 else z.p5_res, work)
    t0 = time.perf_counter()
    s = _search(space, work, "p5", data_dir, num_samples=z.p5_trials, max_epochs=z.p5_epochs, weights=str(weights),
                subset=z.p5_subset, time_budget=z.p5_budget)
    wall = time.perf_counter() - t0
    print(f"P5 vgg16_frozen {z.p5_trials} trials x {z.p5_epochs} epochs: {wall:.0f}s "
          f"(subset {z.p5_subset}, {z.p5_res} px)", flush=True)
    return wall, {"trials": s["trials"], "trials_run": _ran(work / "p5"), "test_acc": s["test_acc"],
                  "imagenet_weights": imagenet, "phases": s["phases"]}


def accept_search(space: str, dev: torch.device, data_dir: str | None, flags: dict[str, Any], work: Path,
                  name: str, weights: Path | None = None) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    s = _search(_space_at(space, flags.get("set_resolution"), work), work, name, data_dir,
                weights=str(weights) if weights else None, **_flags(flags))
    wall = time.perf_counter() - t0
    print(f"{name}: {space} test_acc {s['test_acc']:.4f} ({s['trials']} trials, {wall:.0f}s)", flush=True)
    return s["test_acc"], {"space": space, "flags": flags, "trials": s["trials"],
                           "configurations": _ran(work / name), "val_acc": s["val_acc"],
                           "wall_s": round(wall, 1), "status_counts": s["status_counts"],
                           "best_config": s["best_config"]}


def run_accept(dev: torch.device, quick: bool, data_dir: str | None, work: Path, cifar) -> dict[str, Any]:
    """The acceptance set, each part timed, with its target and verdict."""
    from ..data.sources import resolve_data_dir
    key = ("cuda" if dev.type == "cuda" else "cpu") + ("-quick" if quick else "")
    z = SIZES[key]
    data_dir = resolve_data_dir(data_dir, False)         # the accuracy runs need the real CIFAR-10
    parts: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    if z.small_data:
        data_dir = small_cifar(cifar, work / "cifar10_small", *z.small_data)
    ray_started = False

    def shared_ray() -> None:      # --quick: after the parts without Ray, so its start-up slows none of them
        nonlocal ray_started
        if quick and not ray_started:
            import ray
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
            ray_started = True
    try:
        parts = accept_parts(dev, key, z, data_dir, work, cifar, shared_ray)
    finally:
        if ray_started:
            import ray
            ray.shutdown()
    total = time.perf_counter() - t_all
    verdicts = [p["verdict"] for p in parts]
    return {"sizes": key, "note": z.note, "data": data_dir, "parts": parts, "total_s": round(total, 1),
            "passed": verdicts.count("pass"), "failed": verdicts.count("fail")}


def small_cifar(cifar, folder: Path, n_train: int, n_test: int) -> str:
    """A copy of CIFAR-10 in its python layout with the first `n_train` training and `n_test` test
    images (the data set is shuffled: every class is there), for runs that must be short."""
    import pickle
    out = folder / "cifar-10-batches-py"
    out.mkdir(parents=True, exist_ok=True)
    flat = cifar.train_x[:n_train].reshape(n_train, -1)
    for i, part in enumerate(np.array_split(np.arange(n_train), 5)):
        with open(out / f"data_batch_{i + 1}", "wb") as f:
            pickle.dump({"data": flat[part], "labels": cifar.train_y[part].tolist()}, f)
    with open(out / "test_batch", "wb") as f:
        pickle.dump({"data": cifar.test_x[:n_test].reshape(n_test, -1), "labels": cifar.test_y[:n_test].tolist()}, f)
    with open(out / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(cifar.classes)}, f)
    return str(folder)


def accept_parts(dev: torch.device, key: str, z: Sizes, data_dir: str, work: Path, cifar,
                 before_searches: Callable[[], None]) -> list[dict[str, Any]]:
    """Each part timed, with its target and verdict: first those without Ray (P1, P4), then the searches."""
    parts: list[dict[str, Any]] = []

    def part(pid: str, fn, sizes: str, label: str | None = None, check=None) -> Any:
        t0 = time.perf_counter()
        value, details = fn()
        seconds = time.perf_counter() - t0
        extra_ok = check(value, details, seconds) if check else True
        parts.append({"part": label or pid, "what": TARGETS[pid][0], "sizes": sizes,
                      "value": None if value is None else round(float(value), 4), "unit": TARGETS[pid][1],
                      "target": target_text(pid), "verdict": verdict(pid, value, dev, extra_ok),
                      "seconds": round(seconds, 1), "details": details})
        print(f"accept {parts[-1]['part']}: {parts[-1]['value']} (target {parts[-1]['target']}): "
              f"{parts[-1]['verdict']} [{seconds:.0f}s]", flush=True)
        return details

    big = f"224 px rows at {z.p1_max_res}-64 px" if z.p1_max_res else "each model's own resolution"
    part("P1", lambda: accept_p1(dev, cifar, z), f"{len(MODES)} rows, {big}, {z.p1_steps} timed steps")
    sizes4 = f"{z.p4_res} px, batch {z.p4_batch}, {z.p4_steps} timed steps"
    part("P4", lambda: accept_p4(dev, cifar, z), sizes4)
    compiled = part("P4c", lambda: accept_p4(dev, cifar, z, z.p4_backend), sizes4 + f", backend {z.p4_backend}")
    compiled["speedup_vs_eager"] = round(parts[-1]["value"] / parts[-2]["value"], 3)
    before_searches()
    part("P2", lambda: accept_p2(dev, data_dir, z, work),
         f"{z.p2_trials} trials, {z.p2_epochs} epochs, subset {z.p2_subset or 'all'}")
    part("P3", lambda: accept_p3(dev, data_dir, z, work),
         f"{z.p3_trials} trials x 2 searches, {z.p3_epochs} epochs, subset {z.p3_subset or 'all'}")
    sizes5 = f"{z.p5_trials} trials x {z.p5_epochs} epochs, {z.p5_res} px, subset {z.p5_subset or 'all'}"
    p5 = part("P5", lambda: accept_p5(dev, data_dir, z, work), sizes5)
    acc = "P6cpu" if key == "cpu" else "P6"
    part(acc, lambda: accept_search("simple_cnn", dev, data_dir, z.p6, work, "p6"), _describe(z.p6), label="P6",
         check=(lambda v, d, s: d["configurations"] >= 16) if acc == "P6cpu" else None)
    part("P7", lambda: accept_search("resnet18_scratch", dev, data_dir, z.p7, work, "p7"), _describe(z.p7),
         check=lambda v, d, s: s <= 600)
    if p5.get("imagenet_weights"):
        parts.append({"part": "pretrained vgg16_frozen", "what": "P5's search with the ImageNet weights: test accuracy",
                      "sizes": sizes5, "value": round(p5["test_acc"], 4), "unit": "acc",
                      "target": target_text("pretrained"), "verdict": "reported", "seconds": 0.0, "details": {}})
    space, flags = z.pretrained
    model = space.split("_")[0]
    weights = pretrained_weights(model)
    if weights is not None:
        part("pretrained", lambda: accept_search(space, dev, data_dir, flags, work, "pretrained", weights),
             _describe(flags), label=f"pretrained {space}")
    else:
        from ..training.models import hub_cache_file
        parts.append({"part": f"pretrained {space}", "what": TARGETS["pretrained"][0], "sizes": _describe(flags),
                      "value": None, "unit": "acc", "target": target_text("pretrained"),
                      "verdict": f"skipped: no ImageNet weights at {hub_cache_file(model)}", "seconds": 0.0,
                      "details": {}})
    return parts


def _describe(flags: dict[str, Any]) -> str:
    words = {"subset": "subset", "max_epochs": "epochs", "num_samples": "trials", "time_budget": "--time-budget",
             "set_resolution": "px"}
    return ", ".join(f"{words.get(k, k)} {v}" for k, v in flags.items()) or "the space's budget"


def accept_markdown(results: dict[str, Any]) -> str:
    a = results["accept"]
    lines = [f"# bench --accept {results['date']} on {results['device']}", "",
             f"sizes: {a['sizes']} — {a['note']}", "",
             "| part | what | sizes | value | target | verdict | seconds |", "|---" * 7 + "|"]
    for p in a["parts"]:
        v = p["value"]
        value = "—" if v is None else (f"{v:,.1f} {p['unit']}" if p["unit"] in ("img/s", "s") else f"{v:.3f}")
        lines.append(f"| {p['part']} | {p['what']} | {p['sizes']} | {value} | {p['target']} | {p['verdict']} | "
                     f"{p['seconds']:.0f} |")
    lines += ["", f"total {a['total_s']:.0f} s; {a['passed']} pass, {a['failed']} fail", ""]
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# bench {results['date']} on {results['device']}", ""]
    if "p1" in results:
        lines += ["| model | mode | px | batch | synthetic img/s | pipeline img/s | P1 |", "|---" * 7 + "|"]
        lines += [f"| {r['model']} | {r['mode']} | {r['resolution']} | {r['batch']} | {r['synthetic_img_s']:,.1f} | "
                  f"{r['pipeline_img_s']:,.1f} | {r['P1']:.3f} |" for r in results["p1"]]
        lines.append("")
    if "search_quality" in results:
        q = results["search_quality"]
        lines += [f"search quality: simple_cnn, {q['budget_s']} s per run, subset {q['subset']}, "
                  f"seeds {q['seeds']}", "",
                  "| variant | configurations evaluated | best val acc | test acc | p (test, paired vs a) |",
                  "|---" * 5 + "|"]
        for variant, row in q["table"].items():
            def ms(key, row=row, fmt=".4f"):
                m, sd = row[key]["mean"], row[key]["std"]
                return f"{m:{fmt}} +- {sd:{fmt}}" if sd is not None else f"{m:{fmt}}"
            p = row.get("p_test_acc_vs_a")
            lines.append(f"| {variant} | {ms('configurations', fmt='.1f')} | {ms('best_val_acc')} | {ms('test_acc')} | "
                         f"{'' if p is None else f'{p:.3f}'} |")
        lines.append("")
    if "rungs" in results:
        lines += ["| round | epoch | Spearman vs final | median val acc |", "|---" * 4 + "|"]
        lines += [f"| {r['round']} | {r['epoch']:.2f} | {r['spearman_vs_final']:+.3f} | {r['median_val_acc']:.3f} |"
                  for r in results["rungs"]["per_round"]]
        lines.append("")
    if "final_model" in results:
        from .final_model import markdown as final_model_markdown
        lines += final_model_markdown(results["final_model"])
    for key in ("p2_p3", "p4", "p5", "cpu_budget"):
        if key in results:
            lines += [f"**{key}**: `{json.dumps(results[key])}`", ""]
    return "\n".join(lines)


def run_bench(device: str | None = None, quick: bool = False, out: Path = Path("bench.json"),
              only: str | None = None, data_dir: str | None = None, accept: bool = False,
              work_dir: Path | None = None) -> dict[str, Any]:
    from ..data.sources import load_images
    from ..data.readers import synthetic_images
    from ..data.store import device_of
    chosen = set((only or ",".join(SCENARIOS)).split(","))
    if not chosen <= set(SCENARIOS):
        raise UserError(f"--only {only}: scenarios are {', '.join(SCENARIOS)}")
    if accept and only:
        raise UserError("--accept runs the fixed acceptance set: leave out --only")
    dev = device_of(device or "auto")
    if accept:
        cifar = load_images(data_dir)       # the acceptance runs need the real data: an error without it
    else:
        try:
            cifar = load_images(data_dir)
        except UserError:
            cifar = synthetic_images()            # P1 needs only same-shape data
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "device": device_name(dev),
                               "torch": torch.__version__, "quick": quick, "data": cifar.source}
    # --work-dir: the experiments stay there, and a later run reuses the ones that finished
    work = Path(work_dir).resolve() if work_dir else Path(tempfile.mkdtemp(prefix="tune_cifar_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    if accept:
        results["accept"] = run_accept(dev, quick, data_dir, work, cifar)
        write_json(out, results)
        write_text(Path(out).with_suffix(".md"), accept_markdown(results))
        print(accept_markdown(results))
        return results
    if "p1" in chosen or "p4" in chosen:
        rows = bench_p1(dev, cifar, quick)
        results["p1"] = rows
        vgg = next(r for r in rows if r["model"] == "vgg16" and r["mode"] == "full")
        results["p4"] = {"vgg16_full_224_img_s": vgg["synthetic_img_s"], "with_pipeline": vgg["pipeline_img_s"]}
    if chosen & {"p2", "p3"}:
        results["p2_p3"] = bench_p2_p3(dev, data_dir, quick, work, chosen)
    if "p5" in chosen:
        results["p5"] = bench_p5(dev, data_dir, quick, work)
    if "cpu_budget" in chosen and dev.type == "cpu":
        results["cpu_budget"] = bench_cpu_budget(data_dir, work)
    if "search_quality" in chosen:
        results["search_quality"] = bench_search_quality(data_dir, quick, work)
    if "rungs" in chosen:
        results["rungs"] = bench_rungs(data_dir, quick, work)
    if "final_model" in chosen:
        from .final_model import bench_final_model
        results["final_model"] = bench_final_model(data_dir, quick, work, cifar)
    write_json(out, results)
    write_text(Path(out).with_suffix(".md"), markdown(results))
    print(markdown(results))
    return results
