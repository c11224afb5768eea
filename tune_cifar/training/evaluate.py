"""Evaluation: loss and accuracy over batches, the test set's metrics (scikit-learn), and the model
rebuilt from a checkpoint. Imports nothing from Ray."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.config import TrainConfig, resolve_resolution
from ..data.store import DeviceData
from .models import build_model, join_frozen, split_frozen
from .step import Runtime, place


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


def evaluate_test(model: nn.Module, cfg: TrainConfig, data: DeviceData) -> dict[str, Any]:
    """Accuracy, confusion matrix and per-class precision / recall / F1 on the test set (scikit-learn)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    rt = Runtime.of(cfg)
    place(model, rt)
    loss, _, preds = evaluate(model, data.test.batches(eval_batch(cfg), rt.resolution,
                                                       channels_last=rt.channels_last), rt)
    y = data.test.y.cpu().numpy()
    labels = list(range(len(data.classes)))
    p, r, f1, support = precision_recall_fscore_support(y, preds, labels=labels, zero_division=0)
    return {"test_acc": float(accuracy_score(y, preds)), "test_loss": loss,
            "confusion_matrix": confusion_matrix(y, preds, labels=labels).tolist(),
            "per_class": [{"class": c, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f1[i]),
                           "support": int(support[i])} for i, c in enumerate(data.classes)],
            "predictions": preds.tolist()}


def model_from_state(cfg: TrainConfig, state: dict[str, Any], num_classes: int) -> nn.Module:
    """Rebuild the trained model from a checkpoint `state` (frozen checkpoints hold only the head)."""
    model = build_model(cfg.model, cfg.mode, num_classes, cfg.width, cfg.weights, cfg.download)
    if cfg.mode == "frozen":
        backbone, head = split_frozen(model, cfg.model)
        head.load_state_dict(state["trained"])
        return join_frozen(backbone, head, cfg.model)
    model.load_state_dict(state["trained"])
    return model
