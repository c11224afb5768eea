"""One configuration -> epochs -> metrics and checkpoints. Imports nothing from Ray.

`fit(cfg, data, on_round)` is a flat loop in the style of airbench: batches come from the
device-resident uint8 store (data/store.py), the optimiser and schedule step per batch, and after every
round (a part of an epoch) `on_round(record, state)` is called — the Ray trainable reports through
it, the plain `train` command prints through it. `state()` builds the resumable state only when
asked, so a caller that does not save pays nothing.

In frozen mode the backbone never changes, so its features are computed once per data set
(features.py) and only the new head is trained on them — the result is the same model as training
head(backbone(x)) with the backbone in eval mode, at a fraction of the cost.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from ..core.config import TrainConfig, UserError
from ..data.store import DeviceData
from .models import build_model, join_frozen, split_frozen
from .step import Runtime, eval_batch, evaluate, make_optimizer, place, train_step

# on_round(record, state): called after every round with its metrics and a function that builds the
# resumable state on demand; returning True stops training after this round.
RoundCallback = Callable[[dict[str, Any], Callable[[], dict[str, Any]]], Any]
NAN_CHECK_EVERY = 25      # steps between finiteness checks (each one is a device sync on CUDA)


@dataclass
class FitResult:
    status: str                        # completed | diverged | early_stopped | stopped (by the caller)
    history: list[dict[str, Any]]
    model: nn.Module

    @property
    def last(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}

    @property
    def best_val_acc(self) -> float:
        return max((h["val_acc"] for h in self.history), default=float("nan"))


def make_schedule(cfg: TrainConfig, opt: torch.optim.Optimizer,
                  total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    warm = max(1, int(cfg.warmup * total_steps)) if cfg.warmup > 0 else 0
    if cfg.schedule == "onecycle":
        # linear up to the peak over `warm` steps, then linearly down to ~0: the airbench recipe
        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return max(0.0, (total_steps - step) / max(1, total_steps - warm))
    elif cfg.schedule == "cosine":
        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total_steps - warm)))
    else:
        def factor(step: int) -> float:
            return (step + 1) / warm if step < warm else 1.0
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def steps_per_epoch(n: int, batch_size: int) -> int:
    return n // batch_size


def check_rounds(n_train: int, batch_size: int, evals_per_epoch: int, where: str) -> None:
    """Every evaluation round must train on at least one full batch; otherwise later rounds would train
    on nothing and the schedule would end early."""
    if steps_per_epoch(n_train, batch_size) < evals_per_epoch:
        what = (f"batch_size={batch_size} is larger than the {n_train} training images" if batch_size > n_train
                else f"an epoch of {n_train} training images has {steps_per_epoch(n_train, batch_size)} full "
                     f"batch(es) of {batch_size}, fewer than evals_per_epoch={evals_per_epoch}")
        raise UserError(f"{where}: {what}: use a smaller batch size or fewer evaluations per epoch")


@dataclass
class Feeds:
    """What one training mode feeds the loop: the module being trained, its batches, the final model.

    pixel modes (scratch, full): batches of augmented images from the device store.
    frozen: the fixed backbone's features are computed once (features.py); only the head trains.
    """
    trained: nn.Module
    train: Callable[[torch.Tensor], Any]         # order slice -> (x, y) batches
    val: Callable[[], Any]                       # -> (x, y) batches
    final_model: Callable[[], nn.Module]

    @classmethod
    def of(cls, cfg: TrainConfig, model: nn.Module, data: DeviceData, rt: Runtime, gen: torch.Generator) -> "Feeds":
        if cfg.mode == "frozen":
            from .features import frozen_features
            backbone, head = split_frozen(model, cfg.model)
            place(backbone, rt)
            feats = frozen_features(backbone, data, rt, key=(cfg.model, cfg.weights))
            return cls(head, lambda order: feats.train.batches(cfg.batch_size, cfg.augment, gen, order),
                       lambda: feats.val.batches(1024), lambda: join_frozen(backbone, head, cfg.model))
        return cls(model,
                   lambda order: data.train.batches(cfg.batch_size, rt.resolution, cfg.augment, gen, order,
                                                    channels_last=rt.channels_last),
                   lambda: data.val.batches(eval_batch(cfg), rt.resolution, channels_last=rt.channels_last),
                   lambda: model)


def rounds_since_best(history: list[dict[str, Any]]) -> int:
    """Evaluations since the validation loss last improved (by 1e-4): early stopping's counter, derived
    from the history so that a resumed run stops exactly where an uninterrupted one would."""
    best, since = float("inf"), 0
    for h in history:
        if h["val_loss"] < best - 1e-4:
            best, since = h["val_loss"], 0
        else:
            since += 1
    return since


def train_steps(cfg: TrainConfig, feeds: Feeds, order: torch.Tensor, opt, sched, rt: Runtime) -> dict[str, float]:
    """One round: a step per batch of `order`; returns the round's train loss, accuracy and images."""
    feeds.trained.train()
    loss_sum = torch.zeros((), device=rt.device)
    correct = torch.zeros((), device=rt.device, dtype=torch.long)
    seen = 0
    for step, (x, y) in enumerate(feeds.train(order)):
        loss, out = train_step(feeds.trained, opt, x, y, rt, cfg.label_smoothing)
        sched.step()
        loss_sum += loss.detach() * len(y)
        correct += (out.argmax(1) == y).sum()
        seen += len(y)
        if step % NAN_CHECK_EVERY == 0 and not torch.isfinite(loss):
            break
    return {"train_loss": loss_sum.item() / max(1, seen), "train_acc": correct.item() / max(1, seen), "seen": seen}


def fit(cfg: TrainConfig, data: DeviceData, on_round: RoundCallback | None = None,
        resume: dict[str, Any] | None = None, max_rounds: int | None = None) -> FitResult:
    """Train `cfg` on `data.train`; validate on `data.val` `evals_per_epoch` times per epoch.

    Training runs in rounds: an epoch's shuffled order is cut into `evals_per_epoch` parts of whole
    batches, and after each part the model is validated and `on_round(record, state)` called (one
    ASHA iteration), so a search can judge and stop a trial after part of an epoch. `on_round`
    returning True, or reaching `max_rounds`, stops the run there (status "completed" if it reached
    the config's last round, else "stopped").
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rt = Runtime.of(cfg)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.mode, len(data.classes), cfg.width, cfg.weights, cfg.download)
    feeds = Feeds.of(cfg, model, data, rt, gen)
    place(feeds.trained, rt)

    n, rounds = len(data.train), cfg.evals_per_epoch
    check_rounds(n, cfg.batch_size, rounds, "training")
    steps_per_round = steps_per_epoch(n, cfg.batch_size) // rounds
    per_round = steps_per_round * cfg.batch_size      # images per round: whole batches, equal rounds
    total_rounds = cfg.epochs * rounds
    opt = make_optimizer(cfg, [p for p in feeds.trained.parameters() if p.requires_grad], rt.device)
    sched = make_schedule(cfg, opt, total_rounds * steps_per_round)
    history: list[dict[str, Any]] = []
    order = torch.randperm(n, generator=gen)
    if resume is not None:
        feeds.trained.load_state_dict(resume["trained"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        gen.set_state(resume["rng"]["generator"])
        torch.set_rng_state(resume["rng"]["torch"])
        history = list(resume["history"])
        order = resume["order"]

    def state() -> dict[str, Any]:
        return {"trained": {k: v.detach().cpu() for k, v in feeds.trained.state_dict().items()},
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "order": order,
                "rng": {"generator": gen.get_state(), "torch": torch.get_rng_state()},
                "history": list(history), "round": len(history), "config": cfg.to_dict()}

    status = "completed"
    last = total_rounds if max_rounds is None else min(total_rounds, max_rounds)
    for r in range(len(history), last):
        part = r % rounds
        if part == 0 and r > 0:
            order = torch.randperm(n, generator=gen)
        t0 = time.perf_counter()
        train = train_steps(cfg, feeds, order[part * per_round:(part + 1) * per_round], opt, sched, rt)
        train_seconds = time.perf_counter() - t0
        # no validation images (the retrain of a cross-validated winner on its whole pool): NaN, not 0
        val_loss, val_acc = evaluate(feeds.trained, feeds.val(), rt)[:2] if len(data.val) else (math.nan, math.nan)
        record = {"round": r + 1, "epoch": round((r + 1) / rounds, 4), "train_loss": train["train_loss"],
                  "train_acc": train["train_acc"], "val_loss": val_loss, "val_acc": val_acc,
                  "lr": sched.get_last_lr()[0], "seconds": time.perf_counter() - t0,
                  "images_per_s": train["seen"] / max(train_seconds, 1e-9), "precision_used": rt.precision_used}
        if not (math.isfinite(record["train_loss"]) and (math.isfinite(val_loss) or not len(data.val))):
            status = "diverged"
            record.update(val_acc=0.0, val_loss=float("nan"))
        history.append(record)
        if status != "diverged" and cfg.patience and rounds_since_best(history) >= cfg.patience:
            status = "early_stopped"
        stop = on_round is not None and on_round(dict(record, status="running" if status == "completed" else status),
                                                 state)
        if status != "completed":
            break
        if stop:
            status = "stopped" if r + 1 < total_rounds else status
            break
    else:
        if len(history) < total_rounds:
            status = "stopped"          # max_rounds came first
    return FitResult(status, history, feeds.final_model())
