"""The experiment's one look at the test set, and the files it leaves: best_model.pt (the chosen
model with its config and classes) and test_predictions.json. Called once per experiment, by the
search's result writer or by the --cv-top stage after its retrain."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .folders import write_json, write_torch


def test_once(exp: Path, cfg, state: dict[str, Any] | None = None, model=None) -> dict[str, Any]:
    """The experiment's one look at the test set: the chosen model (`model`, or rebuilt from a trial's
    checkpoint `state`) evaluated once; writes best_model.pt and test_predictions.json."""
    from ..data.cache import device_data
    from ..training.evaluate import evaluate_test, model_from_state

    data = device_data(cfg.replace(threads=None, device="auto"))
    if model is None:
        model = model_from_state(cfg, state, len(data.classes))
    metrics = evaluate_test(model, cfg.replace(device="auto"), data)
    write_torch(exp / "best_model.pt", {"model": model.state_dict(), "config": cfg.to_dict(),
                                        "classes": list(data.classes)})
    write_json(exp / "test_predictions.json", {"predictions": metrics.pop("predictions"),
                                               "labels": data.test.y.cpu().tolist(), "classes": list(data.classes)})
    return {"test_acc": metrics["test_acc"], "test_loss": metrics["test_loss"], "config": cfg.to_dict(),
            "classes": list(data.classes), "test_source": data.test_source, "checkpoint": "best_model.pt",
            "per_class": metrics["per_class"], "confusion_matrix": metrics["confusion_matrix"]}
