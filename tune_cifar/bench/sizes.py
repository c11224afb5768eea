"""How big each part of `bench` runs on each kind of machine, the targets it is checked against,
and the verdicts. No measurement here: parts.py measures, accept.py runs and tabulates."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


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


def sizes_key(dev: torch.device, quick: bool) -> str:
    return ("cuda" if dev.type == "cuda" else "cpu") + ("-quick" if quick else "")
