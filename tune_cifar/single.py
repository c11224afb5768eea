"""`train NAME`: one configuration, no Ray — the search space's default point plus the flags given.

Writes RESULTS/EXP/metrics.json (test_acc, val_acc, epochs, per-epoch history, test metrics) and
RESULTS/EXP/model.pt; `--resume` continues from RESULTS/EXP/checkpoint.pt, saved after every round.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .config import TrainConfig, UserError
from .results import command_line, experiment_dir, start_experiment, write_json, write_torch, write_yaml
from .spaces import check_value, load_space


def plan_train(name: str, overrides: dict[str, Any], results_dir: Path, exp_name: str | None,
               resume: bool, overwrite: bool) -> tuple[TrainConfig, Path]:
    from .tuning import check_data, check_weights, resolve_data_dir
    spec = load_space(name)
    point = spec.default_point()
    cfg = spec.base.replace(**point)
    for key, value in overrides.items():
        check_value(f"--{key.replace('_', '-')}", key, value, cfg)
    cfg = cfg.replace(**{k: v for k, v in overrides.items() if v is not None})
    cfg = cfg.replace(data_dir=resolve_data_dir(cfg.data_dir, cfg.download), download=False)
    cfg.check("train")
    check_data(cfg)
    check_weights(cfg)
    exp = experiment_dir(results_dir, exp_name or f"train_{spec.name}", resume=resume, overwrite=overwrite)
    if resume and not (exp / "checkpoint.pt").exists():
        raise UserError(f"--resume: {exp}/checkpoint.pt does not exist")
    return cfg, exp


def run_train(cfg: TrainConfig, exp: Path, resume: bool, overwrite: bool) -> dict[str, Any]:
    import torch

    from .data import load_for
    from .train import evaluate_test, fit

    started = time.time()
    start_experiment(exp, overwrite=overwrite)
    state = None
    if resume:
        state = torch.load(exp / "checkpoint.pt", map_location="cpu", weights_only=False)
        cfg = TrainConfig.from_dict(state["config"], where=str(exp / "checkpoint.pt"))
    else:
        write_yaml(exp / "spec.yaml", {"command": command_line(), "config": cfg.to_dict()})
    data = load_for(cfg)
    print(f"{cfg.model} {cfg.mode}: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test "
          f"images from {data.source}", flush=True)

    def on_epoch(record: dict[str, Any], checkpoint) -> None:
        write_torch(exp / "checkpoint.pt", checkpoint())
        print(f"epoch {record['epoch']:g}: train_loss={record['train_loss']:.4f} train_acc={record['train_acc']:.4f} "
              f"val_loss={record['val_loss']:.4f} val_acc={record['val_acc']:.4f} "
              f"({record['seconds']:.1f}s, {record['images_per_s']:.0f} img/s)", flush=True)

    result = fit(cfg, data, on_epoch=on_epoch, resume=state)
    metrics = evaluate_test(result.model, cfg, data)
    metrics.pop("predictions")
    out = {"status": result.status, "test_acc": metrics["test_acc"], "val_acc": result.last.get("val_acc"),
           "best_val_acc": result.best_val_acc, "epochs": result.last.get("epoch", 0), **metrics,
           "history": result.history, "config": cfg.to_dict(), "seconds": round(time.time() - started, 2)}
    write_json(exp / "metrics.json", out)
    write_torch(exp / "model.pt", {"model": result.model.state_dict(), "config": cfg.to_dict(),
                                   "classes": list(data.classes)})
    print(f"{result.status} after {out['epochs']:g} epochs in {out['seconds']:.0f}s; results in {exp}")
    print(f"test_acc={metrics['test_acc']:.4f}")
    return out
