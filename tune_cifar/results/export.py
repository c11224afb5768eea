"""`export EXP --format pt|pt2|onnx|torchscript`: the final model of an experiment, ready to serve.

The final model is one module (training/final.py): a single network, or the bagged ensemble of the
cross-validation's split models, with the flip test-time augmentation inside when the experiment
declared it, so a user's runtime computes exactly the tool's own predictions.

  pt           best_model.pt's record (every member's state dict and config, the final kind and TTA):
               training/final.FinalModel.from_record rebuilds the predictor
  pt2          a torch.export ExportedProgram (torch.export.load(path).module()(x)), batch size dynamic
  onnx         torch.onnx's dynamo exporter (the TorchScript-based one, `dynamo=False`, is deprecated in
               torch 2.14), batch size dynamic (torch.export.Dim), checked with onnx.checker
  torchscript  torch.jit.trace: deprecated by torch 2.14 in favour of torch.export (pt2); kept for
               existing users

Next to the model goes `<file>.json` with what a user needs to feed it: input resolution, mean and
std (on 0..1 pixels: the ones training normalised with), channel order, the class names in the
order of the model's outputs, and what the outputs are (logits of one network, or log-probabilities:
the log of the mean softmax over members and views).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from ..core.config import TrainConfig, UserError, resolve_resolution
from ..data.store import MEAN, STD
from ..training.final import FinalModel
from .folders import write_json, write_torch

SUFFIX = {"pt": ".pt", "pt2": ".pt2", "onnx": ".onnx", "torchscript": ".torchscript.pt"}
EXAMPLE_BATCH = 2         # torch.export specialises a dimension whose example size is 0 or 1


def load_final(exp: Path) -> tuple[FinalModel, dict[str, Any]]:
    """The final model of a search (best_model.pt) or train (model.pt) experiment, and its saved record."""
    for name in ("best_model.pt", "model.pt"):
        if (exp / name).is_file():
            saved = torch.load(exp / name, map_location="cpu", weights_only=True)
            return FinalModel.from_record(saved, where=str(exp / name)), saved
    raise UserError(f"{exp}: no best_model.pt or model.pt to export")


def load_trained(exp: Path) -> tuple[torch.nn.Module, TrainConfig, list[str]]:
    """The final predictor of an experiment (one module, in eval mode), its config and classes."""
    final, saved = load_final(exp)
    return final.predictor(), final.config, list(saved["classes"])


def export(exp: Path, fmt: str, out: Path | None = None) -> Path:
    if fmt not in SUFFIX:
        raise UserError(f"--format {fmt} is not one of {', '.join(SUFFIX)}")
    final, saved = load_final(exp)
    cfg, classes, model = final.config, list(saved["classes"]), final.predictor()
    res = resolve_resolution(cfg.model, cfg.mode, cfg.resolution)
    out = Path(out) if out else exp / f"export_{cfg.model}_{cfg.mode}{SUFFIX[fmt]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(EXAMPLE_BATCH, 3, res, res)
    if fmt == "pt":
        write_torch(out, final.record(classes))
    elif fmt == "pt2":
        program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(program, str(out))
    elif fmt == "torchscript":
        print("note: --format torchscript is deprecated (torch 2.14 deprecates torch.jit.trace / torch.jit.load); "
              "--format pt2 (torch.export) replaces it", file=sys.stderr)
        scripted = torch.jit.trace(model, example)
        scripted.save(str(out))
    else:
        export_onnx(model, example, out, "logits" if final.summary()["output"] == "logits" else "log_probs")
    summary = final.summary()
    write_json(out.with_name(out.name + ".json"), {
        "format": fmt, "model": cfg.model, "mode": cfg.mode, "resolution": res,
        "final": {k: summary[k] for k in ("kind", "tta", "n_members")},
        "input": "float32 NCHW RGB (grayscale / palette / RGBA converted to RGB, alpha dropped), centre-cropped "
                 "to a square and resized to resolution x resolution, pixels scaled to 0..1, then (x - mean) / std",
        "mean": list(MEAN), "std": list(STD), "num_classes": len(classes), "classes": classes,
        "output": ("logits, one per class in the order of classes" if summary["output"] == "logits" else
                   "log-probabilities, one per class in the order of classes: the log of the mean softmax over "
                   "the ensemble's members and the test-time views (argmax: the prediction)")})
    return out


def export_onnx(model: torch.nn.Module, example: torch.Tensor, out: Path, output: str) -> None:
    """torch.onnx's dynamo exporter (torch.export underneath) with a dynamic batch size; the weights
    inside the one .onnx file; onnx.checker checks the result."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (the dynamo exporter translates with it)
    except ImportError:
        raise UserError("ONNX export needs the onnx extra: pip install -e '.[onnx]'") from None
    program = torch.onnx.export(model, (example,), input_names=["image"], output_names=[output],
                                dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False)
    program.save(str(out), external_data=False)
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
