"""How a batch runs on this device: the Runtime (device, bf16, memory layout), the model's placement,
the one training step and the evaluation pass. Shared by the loop (fit.py), the test (evaluate.py),
the `--gpus-per-trial auto` measurement (gpu_share.py) and the benchmarks, so what they measure is
what trains. Imports nothing from Ray."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.config import TrainConfig, resolve_resolution
from ..data.store import device_of
from .models import REGISTRY


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16), so that oneDNN's bf16
    convolutions beat fp32: 1.6-1.8x for simple_cnn on the 2-core development machine (BENCHMARKS.md).
    oneDNN's own "bf16 supported" also says yes on AVX512 CPUs without these instructions, where bf16
    is emulated and slower than fp32, so the instructions themselves are asked for."""
    caps = getattr(torch.cpu, "get_capabilities", None)
    if caps is None:                             # an older torch: no capability table, stay in fp32
        return False
    found = caps()
    return bool(found.get("avx512_bf16") or found.get("amx_bf16"))


@dataclass
class Runtime:
    """How a config runs on this device: decided once, shared by training and evaluation."""
    device: torch.device
    resolution: int
    autocast_dtype: torch.dtype | None
    channels_last: bool

    @classmethod
    def of(cls, cfg: TrainConfig) -> "Runtime":
        device = device_of(cfg.device)
        cuda = device.type == "cuda"
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and (
            (cuda and REGISTRY[cfg.model].bf16) or (device.type == "cpu" and cpu_has_bf16())))
        if cuda:
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        return cls(device, resolve_resolution(cfg.model, cfg.mode, cfg.resolution),
                   torch.bfloat16 if bf16 else None, channels_last=True)

    @property
    def precision_used(self) -> str:
        """What `precision: auto` resolved to here ("bf16" or "fp32"), recorded with every round: a
        cluster's workers can differ from the driver, and from each other."""
        return "bf16" if self.autocast_dtype == torch.bfloat16 else "fp32"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def make_optimizer(cfg: TrainConfig, params: list[nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    fused = {"fused": True} if device.type == "cuda" else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov and cfg.momentum > 0, **fused)
    opt = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return opt(params, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay, **fused)


def place(module: nn.Module, rt: Runtime) -> nn.Module:
    """The module on the config's device, in channels_last when the Runtime says so (the input
    batches are made in the same layout: data.store.to_model_input)."""
    module.to(rt.device)
    if rt.channels_last:
        module.to(memory_format=torch.channels_last)
    return module


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, rt: Runtime,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward under the Runtime's autocast, cross-entropy, backward, optimiser step: (loss, logits)."""
    with rt.autocast():
        out = model(x)
        loss = F.cross_entropy(out, y, label_smoothing=label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss, out


def eval_batch(cfg: TrainConfig) -> int:
    return max(cfg.batch_size, 512 if resolve_resolution(cfg.model, cfg.mode, cfg.resolution) <= 64 else 128)


@torch.no_grad()
def evaluate(model: nn.Module, batches, rt: Runtime) -> tuple[float, float, np.ndarray]:
    """(mean loss, accuracy, predictions) over an iterable of (x, y) batches, without smoothing."""
    model.eval()
    loss_sum = torch.zeros((), device=rt.device)
    preds = []
    n = correct = 0
    for x, y in batches:
        with rt.autocast():
            out = model(x)
        loss_sum += F.cross_entropy(out.float(), y, reduction="sum")
        p = out.argmax(1)
        correct += int((p == y).sum())
        n += len(y)
        preds.append(p.cpu())
    preds_np = torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)
    return loss_sum.item() / max(1, n), correct / max(1, n), preds_np
