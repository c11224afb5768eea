"""The only Ray-aware piece of training: a Tune function trainable around `train.fit`.

Fast path: the data set is read and moved to the device once per worker process (data.load_for
caches it), and search.py / kfold.py run with `reuse_actors=True`, so a worker runs trial after
trial without a new process, a new `import torch` or a new copy of the data.

Each evaluation round is reported with `ray.tune.report` together with a checkpoint, so ASHA can
stop the trial and a crashed or interrupted trial restarts from its last round.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from .config import TrainConfig
from .data import load_for
from .train import fit

CONFIG_KEYS = {f.name for f in fields(TrainConfig)}
STATE_FILE = "state.pt"
# Statuses a trial can end with; the searcher gets val_acc = 0.0 for diverged and oom trials.
FAILED_VALUE = 0.0


class InjectedFault(RuntimeError):
    """Raised on purpose by the fault-injection hook (`_inject`), for resilience tests."""


def split_config(config: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any]]:
    """Tune's flat config -> (TrainConfig, extras). Extras start with '_': the K-fold candidate and
    fold (`_candidates[_candidate]` holds its hyper-parameters), fault injection."""
    extras = {k: v for k, v in config.items() if k.startswith("_")}
    values = {k: v for k, v in config.items() if k in CONFIG_KEYS}
    if "_candidate" in extras:
        values.update(extras["_candidates"][extras["_candidate"]])
    cfg = TrainConfig.from_dict(values, where="trial config")
    return cfg, extras


def trial_dirname(trial) -> str:
    """Short trial folders, `trial_<n>_<id>`, n counting from 1 in the order Tune created them."""
    return f"trial_{trial.experiment_tag.split('_', 1)[0]}_{trial.trial_id}"


def trial_number(trial_dir: str | Path | None) -> int | None:
    """n of a `trial_dirname` folder (None for a folder not named by it)."""
    parts = Path(trial_dir or "").name.split("_")
    return int(parts[1]) if len(parts) >= 2 and parts[0] == "trial" and parts[1].isdigit() else None


def trial_index() -> int:
    """1, 2, 3, ... in the order Tune created the trials (read back from `trial_dirname`)."""
    return trial_number(tune.get_context().get_trial_dir())


def run_trial(config: dict[str, Any]) -> None:
    cfg, extras = split_config(config)
    fold = (extras["_fold_index"], extras["_k"]) if "_fold_index" in extras else None
    data = load_for(cfg, fold=fold)

    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)

    inject = extras.get("_inject") or {}
    me = trial_index()
    raise_at = inject.get("raise", {}).get(str(me))           # fails on every attempt
    if resume is None:
        raise_at = inject.get("raise_once", {}).get(str(me), raise_at)   # fails on the first only
    nan_at = inject.get("nan", {}).get(str(me))
    oom_at = inject.get("oom", {}).get(str(me))
    node = f"{ray.util.get_node_ip_address()}/{ray.get_runtime_context().get_node_id()[:8]}"

    def on_epoch(record: dict[str, Any], state) -> None:
        if raise_at is not None and record["round"] >= raise_at:
            raise InjectedFault(f"injected fault in trial {me} at round {raise_at}")
        if oom_at is not None and record["round"] >= oom_at:
            raise torch.cuda.OutOfMemoryError(f"injected out-of-memory in trial {me}")
        with tempfile.TemporaryDirectory() as d:
            torch.save(state(), os.path.join(d, STATE_FILE))
            # fit() already reports val_acc = 0.0 for a diverged round; add the node the trial runs on
            tune.report(dict(record, node=node), checkpoint=tune.Checkpoint.from_directory(d))

    try:
        fit(cfg, data, on_epoch=on_epoch, resume=resume, poison_at=nan_at)
    except torch.cuda.OutOfMemoryError:
        # Retrying would run out of memory again: record it with the way out, let the search go on.
        tune.report({"val_acc": FAILED_VALUE, "status": "oom",
                     "error": f"CUDA out of memory at batch_size={cfg.batch_size}: use a smaller batch size "
                              "or a larger --gpus-per-trial (fewer trials per GPU)"})
