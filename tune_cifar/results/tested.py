"""The experiment's one look at the test set, and the files it leaves: best_model.pt (the chosen
model with its config and classes) and test_predictions.json. Called once per experiment, by the
search's result writer or by the --cv-top stage after its retrain."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .folders import write_json, write_torch


def test_once(exp: Path, cfg, state: dict[str, Any] | None = None, model=None, kind: str = "best_trial",
              tta: str = "none", members: Callable[[int], list] | None = None) -> dict[str, Any]:
    """The experiment's one look at the test set: the final model (training/final.py) of `kind` with
    test-time augmentation `tta` evaluated once, its members `members(num_classes)`, else the one
    `model`, or the one rebuilt from a trial's checkpoint `state`; writes best_model.pt (the final
    predictor) and test_predictions.json."""
    from ..data.cache import device_data
    from ..training.final import FinalModel, Member
    from ..training.evaluate import evaluate_test, model_from_state

    data = device_data(cfg.replace(threads=None, device="auto"))
    if members is not None:
        chosen = members(len(data.classes))
    else:
        chosen = [Member(cfg, model if model is not None else model_from_state(cfg, state, len(data.classes)))]
    final = FinalModel(kind, tta or "none", chosen)
    metrics = evaluate_test(final.predictor(), cfg.replace(device="auto"), data)
    write_torch(exp / "best_model.pt", final.record(list(data.classes)))
    write_json(exp / "test_predictions.json", {"predictions": metrics.pop("predictions"),
                                               "labels": data.test.y.cpu().tolist(), "classes": list(data.classes)})
    return {"test_acc": metrics["test_acc"], "test_loss": metrics["test_loss"], "config": cfg.to_dict(),
            "classes": list(data.classes), "test_source": data.test_source, "checkpoint": "best_model.pt",
            "per_class": metrics["per_class"], "confusion_matrix": metrics["confusion_matrix"],
            "final": final.summary()}
