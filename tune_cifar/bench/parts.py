"""The measurements of `bench`, one code path each: every part runs the same way under `--only` and
under `--accept`, at the Sizes of the machine it runs on (sizes.py), and returns (value, details).

P1  training images/s per model x mode: synthetic input already on the device vs the real input
    pipeline (device-resident uint8 + crop/flip/resize/normalise); ratio real / synthetic.
    Frozen mode is timed as what it costs: the backbone's forward pass that features.py caches.
P2  an ASHA search of simple_cnn_scratch through Ray Tune vs a plain loop training the same
    configurations for the same rounds; ratio search wall / loop wall (Ray start-up included).
P3  the same search with one trial per device vs several sharing it; trials-per-hour ratio.
P4  VGG16 224 px full fine-tuning images/s, eager and through torch.compile (P4c).
P5  a vgg16_frozen search (32 trials x 10 epochs at the acceptance sizes): wall time.
P6, P7, pretrained  accuracy searches: simple_cnn, resnet18_scratch, a pretrained backbone.

Searches run through the CLI's own entry (`Bench.cli`, the `main` the CLI hands over), so the
command spec.yaml records is the one that ran. Training steps are training/step.py's, the ones
trials run.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..core.config import TrainConfig, UserError, min_resolution, resolve_resolution, value_from_csv
from .sizes import Sizes

MODEL_MODES = [("simple_cnn", "scratch"), ("alexnet", "scratch"), ("alexnet", "frozen"), ("alexnet", "full"),
         ("vgg16", "scratch"), ("vgg16", "frozen"), ("vgg16", "full"),
         ("resnet18", "scratch"), ("resnet18", "frozen"), ("resnet18", "full")]


@dataclass
class Bench:
    """One bench run: the device, its sizes, the data, a work folder and the CLI entry searches use."""
    dev: torch.device
    z: Sizes
    key: str                                   # which Sizes: cuda, cuda-quick, cpu, cpu-quick
    data_dir: str | None
    work: Path
    images: Any                                # data.readers.ImageSet: P1's and P4's input
    cli: Callable[[list], int]


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def batch_for(model: str, res: int, dev: torch.device) -> int:
    if dev.type == "cuda":
        return 512 if res <= 64 else 128
    return 256 if res <= 32 else (64 if res <= 64 else 16)


def throughput(model_name: str, mode: str, dev: torch.device, images, steps: int, real: bool,
               resolution: int | None = None, batch: int | None = None, warmup: int = 2,
               compile_backend: str | None = None) -> float:
    """Images/s of training steps (frozen: backbone forward passes) at the model's resolution (or
    `resolution`), after `warmup` untimed steps; `compile_backend`: the model through torch.compile
    with that backend (its compilation happens in the warm-up)."""
    from ..data.store import DeviceSplit
    from ..training.models import architecture, split_frozen
    from ..training.step import Runtime, make_optimizer, place, train_step

    cfg = TrainConfig(model=model_name, mode=mode, device=str(dev), width=32 if model_name == "simple_cnn" else 64,
                      resolution=resolution)
    rt = Runtime.of(cfg)
    bs = batch or batch_for(model_name, rt.resolution, dev)
    model = architecture(model_name, mode, 10, cfg.width)
    frozen = mode == "frozen"
    if frozen:
        model, _ = split_frozen(model, model_name)
        model.eval()
    place(model, rt)
    opt = make_optimizer(cfg, list(model.parameters()), dev)
    if compile_backend:
        model = torch.compile(model, backend=compile_backend)
    gen = torch.Generator().manual_seed(0)
    split = DeviceSplit(images.train_x[: bs * (steps + warmup)], images.train_y[: bs * (steps + warmup)], dev)
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
            train_step(model, opt, x, y, rt)
        if i >= warmup:
            done += len(y)
        if i == steps + warmup - 1:
            break
    _sync(dev)
    return done / (time.perf_counter() - t0)


def search(b: Bench, space: str, name: str, **flags: Any) -> dict[str, Any]:
    """`search SPACE --no-report ...flags` through the CLI; returns its best.json."""
    args = ["search", space, "--results-dir", b.work, "--name", name, "--no-report"]
    args += ["--data-dir", b.data_dir] if b.data_dir else []
    for key, value in flags.items():
        if value is not None:
            args += [f"--{key.replace('_', '-')}", value]
    if b.cli([str(a) for a in args]) != 0:
        raise UserError(f"bench: `{' '.join(str(a) for a in args)}` failed (see above)")
    return json.loads((b.work / name / "best.json").read_text())


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


def ran(exp: Path) -> int:
    """Trials of a finished search that ran at least one round."""
    import pandas as pd
    return int((pd.read_csv(exp / "trials.csv")["rounds"] > 0).sum())


def space_at(space: str, resolution: int | None, work: Path, **fixed: Any) -> str:
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


def small_cifar(images, folder: Path, n_train: int, n_test: int) -> str:
    """A copy of CIFAR-10 in its python layout with the first `n_train` training and `n_test` test
    images (the data set is shuffled: every class is there), for runs that must be short."""
    import pickle

    import numpy as np
    out = folder / "cifar-10-batches-py"
    out.mkdir(parents=True, exist_ok=True)
    flat = images.train_x[:n_train].reshape(n_train, -1)
    for i, part in enumerate(np.array_split(np.arange(n_train), 5)):
        with open(out / f"data_batch_{i + 1}", "wb") as f:
            pickle.dump({"data": flat[part], "labels": images.train_y[part].tolist()}, f)
    with open(out / "test_batch", "wb") as f:
        pickle.dump({"data": images.test_x[:n_test].reshape(n_test, -1), "labels": images.test_y[:n_test].tolist()}, f)
    with open(out / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(images.classes)}, f)
    return str(folder)


def p1(b: Bench) -> tuple[float, dict[str, Any]]:
    z, rows = b.z, []
    for model, mode in MODEL_MODES:
        res = resolve_resolution(model, mode, None)
        if z.p1_max_res is not None and res > z.p1_max_res:
            res = max(z.p1_max_res, min_resolution(model))
        bs = (z.p1_batch[0] if res <= 64 else z.p1_batch[1]) if z.p1_batch else batch_for(model, res, b.dev)
        kw = dict(resolution=res, batch=bs, warmup=z.p1_warmup)
        syn = throughput(model, mode, b.dev, b.images, z.p1_steps, real=False, **kw)
        real = throughput(model, mode, b.dev, b.images, z.p1_steps, real=True, **kw)
        rows.append({"model": model, "mode": mode, "resolution": res, "batch": bs, "synthetic_img_s": round(syn, 1),
                     "pipeline_img_s": round(real, 1), "P1": round(real / syn, 3)})
        print(f"P1 {model:10s} {mode:8s} {res:4d}px  synthetic {syn:9.1f} img/s  pipeline {real:9.1f} img/s  "
              f"ratio {real / syn:.3f}", flush=True)
    return min(r["P1"] for r in rows), {"rows": rows}


def p2(b: Bench) -> tuple[float, dict[str, Any]]:
    z = b.z
    one = {"gpus_per_trial": 1.0} if b.dev.type == "cuda" else {"cpus_per_trial": os.cpu_count() or 1}
    s = search(b, "simple_cnn", "p2", num_samples=z.p2_trials, max_epochs=z.p2_epochs, subset=z.p2_subset, **one)
    search_s = s["phases"]["ray_start"] + s["phases"]["search"]
    loop_s = plain_loop(b.work / "p2", z.p2_subset)
    print(f"P2 search {search_s:.1f}s vs plain loop {loop_s:.1f}s: ratio {search_s / loop_s:.3f}", flush=True)
    return search_s / loop_s, {"search_s": round(search_s, 1), "plain_loop_s": round(loop_s, 1), "flags": one,
                               "trials": s["trials"], "subset": z.p2_subset, "max_epochs": z.p2_epochs}


def p3(b: Bench) -> tuple[float, dict[str, Any]]:
    z = b.z
    if b.dev.type == "cuda":
        one, shared = {"gpus_per_trial": 1.0}, {"gpus_per_trial": 0.25}
    else:                                        # the CPU's cores are the shared device
        cores = os.cpu_count() or 2
        one, shared = {"cpus_per_trial": cores}, {"cpus_per_trial": max(1, cores // 4)}
    rates, trials_run = {}, {}
    for label, flags in (("one_per_device", one), ("shared", shared)):
        name = f"p3_{label}"
        s = search(b, "simple_cnn", name, num_samples=z.p3_trials, max_epochs=z.p3_epochs, subset=z.p3_subset,
                   time_budget=z.p3_budget, **flags)
        trials_run[label] = ran(b.work / name)
        rates[label] = trials_run[label] / (s["phases"]["search"] / 3600)
    ratio = rates["shared"] / rates["one_per_device"]
    print(f"P3 trials/hour shared {rates['shared']:.0f} vs one per device {rates['one_per_device']:.0f}: "
          f"{ratio:.2f}x", flush=True)
    return ratio, {"flags": {"one": one, "shared": shared}, "trials_run": trials_run,
                   "trials_per_hour": {k: round(v, 1) for k, v in rates.items()}}


def p4(b: Bench, backend: str | None = None) -> tuple[float, dict[str, Any]]:
    """VGG16 full fine-tuning img/s at P4's sizes: eager, or through torch.compile with `backend`
    (compiled during the warm-up steps, which are not timed)."""
    z = b.z
    rate = throughput("vgg16", "full", b.dev, b.images, z.p4_steps, real=False, resolution=z.p4_res,
                      batch=z.p4_batch, warmup=3, compile_backend=backend)
    print(f"P4 VGG16 {z.p4_res}px full fine-tuning, {f'torch.compile ({backend})' if backend else 'eager'}: "
          f"{rate:.1f} img/s", flush=True)
    return rate, {"resolution": z.p4_res, "batch": z.p4_batch, "steps": z.p4_steps, "compile_backend": backend}


def pretrained_weights(model: str) -> Path | None:
    """torchvision's cached ImageNet file of `model`, when this machine has it (never downloaded here)."""
    from ..training.models import hub_cache_file
    path = hub_cache_file(model)
    return path if path.is_file() else None


def p5(b: Bench) -> tuple[float, dict[str, Any]]:
    import torchvision
    z = b.z
    weights = pretrained_weights("vgg16")
    imagenet = weights is not None
    if weights is None:                          # same shapes, same speed: the time does not depend on values
        weights = b.work / "vgg16_random.pth"
        torch.save(torchvision.models.vgg16().state_dict(), weights)
    space = space_at("vgg16_frozen", None if z.p5_res == 224 else z.p5_res, b.work)
    t0 = time.perf_counter()
    s = search(b, space, "p5", num_samples=z.p5_trials, max_epochs=z.p5_epochs, weights=str(weights),
               subset=z.p5_subset, time_budget=z.p5_budget)
    wall = time.perf_counter() - t0
    print(f"P5 vgg16_frozen {z.p5_trials} trials x {z.p5_epochs} epochs: {wall:.0f}s "
          f"(subset {z.p5_subset}, {z.p5_res} px)", flush=True)
    return wall, {"trials": s["trials"], "trials_run": ran(b.work / "p5"), "test_acc": s["test_acc"],
                  "imagenet_weights": imagenet, "phases": s["phases"]}


def accuracy(b: Bench, space: str, flags: dict[str, Any], name: str,
             weights: Path | None = None) -> tuple[float, dict[str, Any]]:
    """An accuracy search (P6, P7, pretrained): its test accuracy. flags' set_resolution=R runs a
    copy of the space at R px."""
    t0 = time.perf_counter()
    s = search(b, space_at(space, flags.get("set_resolution"), b.work), name,
               weights=str(weights) if weights else None, **{k: v for k, v in flags.items() if k != "set_resolution"})
    wall = time.perf_counter() - t0
    print(f"{name}: {space} test_acc {s['test_acc']:.4f} ({s['trials']} trials, {wall:.0f}s)", flush=True)
    return s["test_acc"], {"space": space, "flags": flags, "trials": s["trials"],
                           "configurations": ran(b.work / name), "val_acc": s["val_acc"],
                           "wall_s": round(wall, 1), "status_counts": s["status_counts"],
                           "best_config": s["best_config"]}
