"""`export EXP --format pt|torchscript|onnx`: the best model of an experiment, ready to serve.

Next to the model goes `<file>.json` with what a user needs to feed it: input resolution, mean and
std (on 0..1 pixels: the ones training normalised with), channel order and the class names, in the
order of the model's outputs (as many as the data set had: 10 for CIFAR-10, 100 for CIFAR-100, the
class folders of an image-folder data set).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..core.config import TrainConfig, UserError
from ..data.store import MEAN, STD
from .folders import write_json, write_torch
from ..core.config import resolve_resolution
from ..training.models import architecture

SUFFIX = {"pt": ".pt", "torchscript": ".torchscript.pt", "onnx": ".onnx"}


def load_trained(exp: Path) -> tuple[torch.nn.Module, TrainConfig, list[str]]:
    """The trained model of a search (best_model.pt) or train (model.pt) experiment, in eval mode."""
    for name in ("best_model.pt", "model.pt"):
        if (exp / name).is_file():
            saved = torch.load(exp / name, map_location="cpu", weights_only=True)
            break
    else:
        raise UserError(f"{exp}: no best_model.pt or model.pt to export")
    cfg = TrainConfig.from_dict(saved["config"], where=str(exp / name))
    model = architecture(cfg.model, cfg.mode, len(saved["classes"]), cfg.width)
    model.load_state_dict(saved["model"])
    return model.eval(), cfg, list(saved["classes"])


def export(exp: Path, fmt: str, out: Path | None = None) -> Path:
    if fmt not in SUFFIX:
        raise UserError(f"--format {fmt} is not one of {', '.join(SUFFIX)}")
    model, cfg, classes = load_trained(exp)
    res = resolve_resolution(cfg.model, cfg.mode, cfg.resolution)
    out = Path(out) if out else exp / f"export_{cfg.model}_{cfg.mode}{SUFFIX[fmt]}"
    example = torch.zeros(1, 3, res, res)
    if fmt == "pt":
        write_torch(out, {"model": model.state_dict(), "config": cfg.to_dict(), "classes": classes})
    elif fmt == "torchscript":
        scripted = torch.jit.trace(model, example)
        out.parent.mkdir(parents=True, exist_ok=True)
        scripted.save(str(out))
    else:
        try:
            import onnx  # noqa: F401
        except ImportError:
            raise UserError("ONNX export needs the onnx extra: pip install -e '.[onnx]'") from None
        torch.onnx.export(model, example, str(out), input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    write_json(out.with_name(out.name + ".json"), {
        "format": fmt, "model": cfg.model, "mode": cfg.mode, "resolution": res,
        "input": "float32 NCHW RGB (grayscale / palette / RGBA converted to RGB, alpha dropped), centre-cropped "
                 "to a square and resized to resolution x resolution, pixels scaled to 0..1, then (x - mean) / std",
        "mean": list(MEAN), "std": list(STD), "num_classes": len(classes), "classes": classes,
        "output": "logits, one per class in the order of classes"})
    return out
