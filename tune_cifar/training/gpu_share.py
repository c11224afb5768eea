"""`--gpus-per-trial auto`: how many trials share one GPU, from one measured training step.

The decision is plain arithmetic on two numbers — the peak memory one trial's training step
allocates and the GPU's total memory — so it is tested without a GPU; only `measure_peak_bytes`
touches CUDA. Imports torch only (lazily), never Ray.

    def measure():                       # on the driver, before Ray starts the trials
        peak = measure_peak_bytes(one_step, "cuda:0")   # the space's largest batch / resolution
        return peak, torch.cuda.get_device_properties(0).total_memory
    plan = auto_share(torch.cuda.device_count(), measure)
    print(plan["note"]); opts.gpus_per_trial = plan["gpus_per_trial"]   # and record plan in plan.json
"""
from __future__ import annotations

import math
from typing import Any, Callable

GIB = 1024 ** 3

# Each trial is its own Ray worker process, and each process pays, outside what PyTorch's
# allocator reports as allocated: its CUDA context with cuDNN / cuBLAS kernels and workspaces
# loaded (~0.5-0.7 GiB on an H100 with CUDA 12/13), plus the caching allocator's rounding and
# fragmentation (reserved minus allocated). 1 GiB per trial covers both.
RESERVED_BYTES = 1 * GIB
# Plan for only 80 % of the card: a step's peak varies between trials of a search (another batch
# size or resolution than the measured one, cuDNN choosing another algorithm), the driver process
# keeps its own context on GPU 0, and running out of memory kills a trial whereas leaving 20 %
# idle costs little.
SAFETY = 0.8
# Beyond ~8 processes time-slicing one GPU, throughput hardly grows (the kernels already overlap)
# while every trial still needs its own CPU cores for Python and its share of host memory.
MAX_TRIALS = 8
# Ray keeps resource quantities as integers in units of 1/10_000 (ray._raylet.RESOURCE_UNIT_SCALING;
# the raylet's FixedPoint(double) rounds d * 10_000 to the nearest unit). 1/n must therefore be
# rounded *down* to 4 decimals, or n requests can exceed 1 GPU: round(10_000 / 6) = 1667 and
# 6 * 1667 = 10_002 > 10_000, so the 6th trial would wait for another GPU.
RAY_RESOURCE_UNITS = 10_000


def trials_per_gpu(peak_bytes: int, total_bytes: int, *, reserved_bytes: int = RESERVED_BYTES,
                   safety: float = SAFETY, max_trials: int = MAX_TRIALS) -> int:
    """The largest n >= 1 with n * (peak_bytes + reserved_bytes) <= safety * total_bytes, at most
    `max_trials`. A trial that does not fit even alone still gets n = 1 (a whole GPU; `decide`
    says so in its note). `reserved_bytes` is counted per trial: every trial is its own process."""
    if peak_bytes <= 0 or total_bytes <= 0:
        raise ValueError(f"peak_bytes and total_bytes must be positive (got {peak_bytes}, {total_bytes})")
    if reserved_bytes < 0 or not 0 < safety <= 1 or max_trials < 1:
        raise ValueError(f"need reserved_bytes >= 0, 0 < safety <= 1, max_trials >= 1 "
                         f"(got {reserved_bytes}, {safety}, {max_trials})")
    fits = int(safety * total_bytes // (peak_bytes + reserved_bytes))
    return max(1, min(max_trials, fits))


def gpu_fraction(n: int) -> float:
    """1/n rounded down to Ray's 1/10_000 resource unit, so that n trials fit on one GPU exactly:
    1 -> 1.0, 3 -> 0.3333, 6 -> 0.1666, 8 -> 0.125."""
    if n < 1 or n > RAY_RESOURCE_UNITS:
        raise ValueError(f"trials per GPU must be between 1 and {RAY_RESOURCE_UNITS} (got {n})")
    return (RAY_RESOURCE_UNITS // n) / RAY_RESOURCE_UNITS


def measure_peak_bytes(build_step: Callable[[], None], device: Any) -> int:
    """Peak bytes PyTorch allocates on CUDA `device` during one call of `build_step` (one training
    step: forward, backward, optimiser step, with the model and optimiser state it keeps alive).

    The step runs once as a warm-up first (lazy CUDA / cuDNN initialisation, cudnn.benchmark's
    algorithm search, optimiser state created on the first step), then the peak statistics are
    reset and the step is measured. The number includes what stays allocated across steps
    (weights, gradients, optimiser state, a device-resident data set) but not the CUDA context or
    the allocator's cache: `trials_per_gpu`'s `reserved_bytes` accounts for those.
    """
    import torch
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"measure_peak_bytes needs a CUDA device, got {device}")
    build_step()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    build_step()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


def decide(peak_bytes: int, total_bytes: int, **limits: Any) -> dict[str, Any]:
    """The sharing decision for one measured step on one GPU, for printing and for plan.json:
    {"trials_per_gpu": n, "gpus_per_trial": 1/n in Ray's units, "peak_gib", "total_gib", "note"}.
    `limits` are `trials_per_gpu`'s keyword arguments (reserved_bytes, safety, max_trials)."""
    reserved = limits.get("reserved_bytes", RESERVED_BYTES)
    safety = limits.get("safety", SAFETY)
    cap = limits.get("max_trials", MAX_TRIALS)
    n = trials_per_gpu(peak_bytes, total_bytes, **limits)
    peak, total = peak_bytes / GIB, total_bytes / GIB
    budget = f"{safety:.0%} of the GPU's {total:.1f} GiB"
    per_trial = f"{peak:.2f} GiB peak + {reserved / GIB:.2f} GiB CUDA context and slack per trial"
    if peak_bytes + reserved > safety * total_bytes:
        note = (f"one trial does not fit in {budget} ({per_trial}): each trial gets a whole GPU and may run "
                f"out of memory; lower the batch size or resolution")
    elif n == cap and (n + 1) * (peak_bytes + reserved) <= safety * total_bytes:
        note = f"{n} trials per GPU (capped at {cap}; {per_trial}, within {budget})"
    else:
        note = f"{n} trial{'s' if n > 1 else ''} per GPU ({per_trial}, within {budget})"
    return {"trials_per_gpu": n, "gpus_per_trial": gpu_fraction(n), "peak_gib": round(peak, 3),
            "total_gib": round(total, 3), "note": note}


def auto_share(device_count: int, measure: Callable[[], tuple[int, int]] | None) -> dict[str, Any]:
    """`--gpus-per-trial auto`. Without a GPU: {"gpus_per_trial": 0, "note": ...} and `measure` is
    never called. With GPUs: `measure()` -> (peak_bytes, total_bytes) of one step on one GPU, then
    `decide` (the fraction applies to every GPU alike: Ray packs n trials onto each)."""
    if device_count <= 0:
        return {"gpus_per_trial": 0, "note": "no GPU: trials run on the CPU"}
    if measure is None:
        raise ValueError(f"{device_count} GPU(s) visible but no measure() given")
    peak, total = measure()
    return decide(peak, total)


# --------------------------------------------------------------------------- a search space's step

def largest(spec, key: str, fixed: Any) -> Any:
    """The largest value a space can draw for `key` (its fixed value when it is not searched)."""
    dist = spec.space.get(key)
    if dist is None:
        return fixed
    values = [v for v in dist.values if v is not None]
    return max(values) if values else fixed


def heaviest_config(spec, cfg):
    """`cfg` with the space's largest batch size, resolution and width: the trial that needs the most."""
    return cfg.replace(batch_size=largest(spec, "batch_size", cfg.batch_size),
                       resolution=largest(spec, "resolution", cfg.resolution),
                       width=largest(spec, "width", cfg.width))


def training_step(cfg, device: Any) -> Callable[[], None]:
    """One training step of `cfg` on `device` as a trial runs it (the same model, Runtime: bf16
    autocast, channels_last, fused optimiser), on synthetic input. Frozen mode: the backbone's
    feature pass at features.py's batch (what a trial's first step runs) and the head's step."""
    import torch

    from .step import Runtime, make_optimizer, place, train_step
    from .models import architecture, split_frozen

    device = torch.device(device)
    rt = Runtime.of(cfg.replace(device=str(device)))
    model = architecture(cfg.model, cfg.mode, 10, cfg.width)
    backbone = None
    if cfg.mode == "frozen":
        backbone, model = split_frozen(model, cfg.model)
        backbone.eval()
    place(model, rt)
    if backbone is not None:
        place(backbone, rt)
    opt = make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad], device)
    res, bs = rt.resolution, cfg.batch_size
    labels = torch.randint(0, 10, (bs,), device=device)

    def images(n: int):
        x = torch.randn(n, 3, res, res, device=device)
        return x.contiguous(memory_format=torch.channels_last) if rt.channels_last else x

    def step() -> None:
        if backbone is not None:
            with torch.no_grad(), rt.autocast():
                feats = backbone(images(256 if res <= 64 else 64))
            x = torch.randn(bs, feats.shape[1], device=device)
        else:
            x = images(bs)
        train_step(model, opt, x, labels, rt)
    return step


def feature_dim(cfg) -> int:
    """Width of the frozen backbone's output (what features.py caches per image)."""
    from .models import architecture, split_frozen
    _, head = split_frozen(architecture(cfg.model, cfg.mode, 10, cfg.width), cfg.model)
    return head.in_features


def resident_bytes(cfg, n_train: int, n_val: int, n_test: int, image_bytes: int) -> int:
    """What a trial keeps on its GPU besides the step: the uint8 data set (data.to_device: train,
    validation and test), and in frozen mode the cached features (features.py: every training image
    plain and flipped, every validation image; counted twice for the concatenation that builds them)."""
    data = (n_train + n_val + n_test) * image_bytes
    if cfg.mode != "frozen":
        return data
    from .models import REGISTRY
    elem = 2 if REGISTRY[cfg.model].bf16 else 4
    return data + 2 * (2 * n_train + n_val) * feature_dim(cfg) * elem


def measure_space(spec, cfg, device: Any = "cuda:0") -> tuple[int, int, int]:
    """(peak bytes of one step of the space's heaviest trial + what the trial keeps resident, the
    GPU's total bytes, the resident part alone), on `device` (the first GPU). Frees what it
    allocated."""

    import torch

    from ..data.cache import images_of
    from ..data.splits import stratified_subset
    heavy = heaviest_config(spec, cfg)
    cifar = images_of(heavy)
    n_pool = len(stratified_subset(cifar.train_y, heavy.subset, heavy.split_seed))
    n_val = math.ceil(heavy.val_fraction * n_pool)
    image_bytes = int(cifar.train_x[0].nbytes)
    resident = resident_bytes(heavy, n_pool - n_val, n_val, len(cifar.test_y), image_bytes)
    try:
        peak = measure_peak_bytes(training_step(heavy, device), device)
    finally:
        torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    return peak + resident, int(total), resident


def plan_share(spec, cfg, gpus_here: int, cluster: bool) -> dict[str, Any]:
    """`--gpus-per-trial auto` for a search space, decided on this machine before Ray starts:
    {"gpus_per_trial": F, "note": ..., ...} — F = 0 on a machine without a GPU (trials on CPUs), or
    None when this machine has none but joins a cluster (nothing to measure here: the space file's
    share stands, and is dropped if the cluster has no GPU either)."""
    import time
    if gpus_here <= 0 and cluster:
        return {"auto": True, "gpus_per_trial": None,
                "note": f"no GPU on this machine to measure on: the space's resources.gpu="
                        f"{spec.resources.gpu:g} per trial (dropped if the cluster has no GPU)"}
    t0 = time.perf_counter()
    measured: dict[str, Any] = {}

    def measure() -> tuple[int, int]:
        peak, total, resident = measure_space(spec, cfg)
        measured["resident_gib"] = round(resident / GIB, 3)
        return peak, total
    decision = auto_share(gpus_here, measure)
    heavy = heaviest_config(spec, cfg)
    if measured:
        decision.update(measured, batch_size=heavy.batch_size, resolution=heavy.resolution,
                        measure_s=round(time.perf_counter() - t0, 2))
    return {"auto": True, **decision}
