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
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .config import TrainConfig, UserError, typed
from .results import write_json, write_text

SCENARIOS = ("p1", "p2", "p3", "p4", "p5", "cpu_budget")
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


def throughput(model_name: str, mode: str, dev: torch.device, cifar, steps: int, real: bool) -> float:
    """Images/s of training steps (frozen: backbone forward passes) at the model's resolution."""
    from .data import DeviceSplit
    from .models import architecture, split_frozen
    from .train import Runtime, make_optimizer

    cfg = TrainConfig(model=model_name, mode=mode, device=str(dev), width=32 if model_name == "simple_cnn" else 64)
    rt = Runtime.of(cfg)
    bs = batch_for(model_name, rt.resolution, dev)
    model = architecture(model_name, mode, 10, cfg.width).to(dev)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    frozen = mode == "frozen"
    if frozen:
        model, _ = split_frozen(model, model_name)
        model.eval()
    opt = make_optimizer(cfg, list(model.parameters()), dev)
    gen = torch.Generator().manual_seed(0)
    split = DeviceSplit(cifar.train_x[: bs * (steps + 2)], cifar.train_y[: bs * (steps + 2)], dev)
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
        if i == 2:                                   # two warm-up steps (cuDNN autotuning, allocator)
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
        if i >= 2:
            done += len(y)
        if i == steps + 1:
            break
    _sync(dev)
    return done / (time.perf_counter() - t0)


def bench_p1(dev: torch.device, cifar, quick: bool) -> list[dict[str, Any]]:
    rows = []
    for model, mode in MODES:
        from .models import resolve_resolution
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
    from .search import SearchOptions, plan_search, run_search
    opts = SearchOptions(results_dir=results, name=name, data_dir=data_dir, report=False, **flags)
    summary = run_search(plan_search(space, opts))
    return summary


def plain_loop(exp: Path, subset: int | None) -> float:
    """Train every configuration of a finished search for the rounds it ran there, no Ray."""
    import pandas as pd

    from .data import load_for
    from .train import fit

    best = json.loads((exp / "best.json").read_text())
    base = TrainConfig.from_dict(best["config"])
    trials = pd.read_csv(exp / "trials.csv").sort_values("trial")
    searched = list(best["best_config"])

    class Enough(Exception):
        pass

    t0 = time.perf_counter()
    data = load_for(base.replace(subset=subset))
    for _, t in trials.iterrows():
        if t["rounds"] == 0:
            continue
        cfg = base.replace(**{k: typed(k, t[k]) for k in searched})

        def stop(record, _state, rounds=int(t["rounds"])):
            if record["round"] >= rounds:
                raise Enough
        try:
            fit(cfg, data, on_epoch=stop)
        except Enough:
            pass
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
        from .spaces import load_space
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
            "trials": best["trials"], "status_counts": best["status_counts"], "test_acc": best["test_acc"],
            "val_acc": best["val_acc"], "phases": best["phases"], "best_config": best["best_config"]}


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# bench {results['date']} on {results['device']}", ""]
    if "p1" in results:
        lines += ["| model | mode | px | batch | synthetic img/s | pipeline img/s | P1 |", "|---" * 7 + "|"]
        lines += [f"| {r['model']} | {r['mode']} | {r['resolution']} | {r['batch']} | {r['synthetic_img_s']:,.1f} | "
                  f"{r['pipeline_img_s']:,.1f} | {r['P1']:.3f} |" for r in results["p1"]]
        lines.append("")
    for key in ("p2_p3", "p4", "p5", "cpu_budget"):
        if key in results:
            lines += [f"**{key}**: `{json.dumps(results[key])}`", ""]
    return "\n".join(lines)


def run_bench(device: str | None = None, quick: bool = False, out: Path = Path("bench.json"),
              only: str | None = None, data_dir: str | None = None) -> dict[str, Any]:
    from .data import device_of, load_cifar10, synthetic_cifar
    chosen = set((only or ",".join(SCENARIOS)).split(","))
    if not chosen <= set(SCENARIOS):
        raise UserError(f"--only {only}: scenarios are {', '.join(SCENARIOS)}")
    dev = device_of(device or "auto")
    try:
        cifar = load_cifar10(data_dir)
    except UserError:
        cifar = synthetic_cifar()            # P1 needs only same-shape data
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "device": device_name(dev),
                               "torch": torch.__version__, "quick": quick, "data": cifar.source}
    work = Path(tempfile.mkdtemp(prefix="tune_cifar_bench_"))
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
    write_json(out, results)
    write_text(Path(out).with_suffix(".md"), markdown(results))
    print(markdown(results))
    return results
