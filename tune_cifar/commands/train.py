"""`train NAME`: one configuration, no Ray — the search space's default point plus the flags given.

Writes RESULTS/EXP/metrics.json (test_acc, val_acc, epochs, per-epoch history, test metrics) and
RESULTS/EXP/model.pt; `--resume` continues from RESULTS/EXP/checkpoint.pt, saved after every round.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..core.config import TrainConfig, UserError
from ..results.folders import (command_line, experiment_dir, read_yaml, start_experiment, write_json, write_torch,
                               write_yaml)
from ..core.spaces import check_value, load_space


def plan_train(name: str, overrides: dict[str, Any], results_dir: Path, exp_name: str | None,
               resume: bool, overwrite: bool, download: bool) -> tuple[TrainConfig, Path]:
    """The config to train (on --resume: the one saved in checkpoint.pt, whatever the flags say) and
    its experiment folder; every check done, nothing written."""
    from ..data.cache import check_data, train_size
    from ..data.sources import resolve_data_dir
    from ..training.fit import check_rounds
    from ..training.models import check_weights
    spec = load_space(name)
    exp = experiment_dir(results_dir, exp_name or f"train_{spec.name}", resume=resume, overwrite=overwrite)
    if resume:
        if not (exp / "checkpoint.pt").exists():
            raise UserError(f"--resume: {exp}/checkpoint.pt does not exist")
        return saved_config(exp), exp
    cfg = spec.base.replace(**spec.default_point())
    values = {key: check_value(f"--{key.replace('_', '-')}", key, value, cfg)
              for key, value in overrides.items() if value is not None}
    cfg = cfg.replace(**values)
    cfg = cfg.replace(data_dir=resolve_data_dir(cfg.data_dir, download), download=download and not cfg.weights)
    cfg.check("train")
    check_data(cfg)
    check_rounds(train_size(cfg), cfg.batch_size, cfg.evals_per_epoch, "train")
    check_weights(cfg)
    return cfg, exp


def read_checkpoint(exp: Path) -> dict[str, Any]:
    """checkpoint.pt as plain data: weights_only=True never runs code hidden in a pickle."""
    import pickle

    import torch
    try:
        return torch.load(exp / "checkpoint.pt", map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise UserError(f"{exp / 'checkpoint.pt'} is not a plain checkpoint ({str(e).splitlines()[0][:120]})") from None


def saved_config(exp: Path) -> TrainConfig:
    return TrainConfig.from_dict(read_checkpoint(exp)["config"], where=str(exp / "checkpoint.pt"))


def train_tta(tta: str | None, exp: Path, resume: bool) -> str:
    """--tta as given; else on --resume what spec.yaml recorded (none for a run from before --tta),
    else the default. Checked before anything is written."""
    from ..core.finals import DEFAULT_TTA, check_tta
    check_tta(tta)
    if tta is not None:
        return tta
    if resume and (exp / "spec.yaml").is_file():
        return (read_yaml(exp / "spec.yaml") or {}).get("tta", "none")
    return DEFAULT_TTA


def run_train(cfg: TrainConfig, exp: Path, resume: bool, overwrite: bool, command: str | None = None,
              tta: str = "none") -> dict[str, Any]:

    from ..data.cache import device_data
    from ..training.evaluate import evaluate_test
    from ..training.final import FinalModel, Member
    from ..training.fit import fit

    started = time.time()
    start_experiment(exp, overwrite=overwrite, resume=resume)
    state = None
    if resume:
        state = read_checkpoint(exp)
    else:
        write_yaml(exp / "spec.yaml", {"command": command or command_line(), "config": cfg.to_dict(), "tta": tta})
    data = device_data(cfg)
    print(f"{cfg.model} {cfg.mode}: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test "
          f"images from {data.source} (test: {data.test_source})", flush=True)

    def on_round(record: dict[str, Any], state) -> None:
        write_torch(exp / "checkpoint.pt", state())
        print(f"epoch {record['epoch']:g}: train_loss={record['train_loss']:.4f} train_acc={record['train_acc']:.4f} "
              f"val_loss={record['val_loss']:.4f} val_acc={record['val_acc']:.4f} "
              f"({record['seconds']:.1f}s, {record['images_per_s']:.0f} img/s)", flush=True)

    result = fit(cfg, data, on_round=on_round, resume=state)
    final = FinalModel("train", tta, [Member(cfg, result.model)])
    metrics = evaluate_test(final.predictor(), cfg, data)
    metrics.pop("predictions")
    out = {"status": result.status, "test_acc": metrics["test_acc"], "val_acc": result.last.get("val_acc"),
           "best_val_acc": result.best_val_acc, "epochs": result.last.get("epoch", 0),
           "precision_used": result.last.get("precision_used"), **metrics,
           "history": result.history, "config": cfg.to_dict(), "test_source": data.test_source,
           "final": final.summary(), "seconds": round(time.time() - started, 2)}
    write_json(exp / "metrics.json", out)
    write_torch(exp / "model.pt", final.record(list(data.classes)))
    print(f"{result.status} after {out['epochs']:g} epochs in {out['seconds']:.0f}s; results in {exp}")
    print(f"test_acc={metrics['test_acc']:.4f}")
    return out
