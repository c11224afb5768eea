"""The test set's metrics (scikit-learn) and the model rebuilt from a checkpoint. Imports nothing
from Ray."""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from ..core.config import TrainConfig
from ..data.store import DeviceData
from .models import build_model, join_frozen, split_frozen
from .step import Runtime, eval_batch, evaluate, place


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
