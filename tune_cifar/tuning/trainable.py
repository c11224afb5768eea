"""The only Ray-aware piece of training: a Tune function trainable around `fit.fit`.

Fast path: the data set is read and moved to the device once per worker process (data.device_data
caches it), and experiments run with `reuse_actors=True`, so a worker runs trial after trial
without a new process, a new `import torch` or a new copy of the data.

Each evaluation round is reported with `ray.tune.report` together with a checkpoint, so ASHA can
stop the trial and a crashed or interrupted trial restarts from its last round.

Every report also says where and when the trial ran (`placement`): its start (the first attempt's,
kept in the checkpoint across retries) and the report's time as ISO 8601, the GPU ids Ray assigned
(`ray.get_gpu_ids()`, which Ray also put into CUDA_VISIBLE_DEVICES) and the device actually used; a
trial given GPU ids on a node without a working CUDA trains on the CPU and says so. trials.csv reads
them back (trials.py).

Fault injection for the resilience tests lives here too (TUNE_CIFAR_INJECT), never in the loop.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import fields
from datetime import datetime
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from ..core.config import TrainConfig, UserError
from ..core.trial import MENDED_FILE, META_FILE, STATE_FILE, candidate_values, fold_of, trial_number
from ..data.cache import device_data
from ..data.splits import Fold
from ..training.fit import fit
from ..training.step import Runtime

CONFIG_KEYS = {f.name for f in fields(TrainConfig)}
# Statuses a trial can end with; the searcher gets val_acc = 0.0 for diverged and oom trials.
FAILED_VALUE = 0.0


class InjectedFault(RuntimeError):
    """Raised on purpose by the fault-injection hook (`_inject`), for resilience tests."""


def fault_injection() -> dict[str, Any]:
    """TUNE_CIFAR_INJECT='{"raise": {"1": 2}, "nan": {"2": 1}}': the first trial raises at round 2 on
    every attempt, the second trial's loss turns NaN from round 1 ("raise_once" fails only the first
    attempt, "oom" raises CUDA's out-of-memory error). Read by the driver when it plans an experiment
    and passed to the trials as `_inject`. For testing the search's resilience; never set in normal use."""
    raw = os.environ.get("TUNE_CIFAR_INJECT")
    if not raw:
        return {}
    try:
        inject = json.loads(raw)
    except ValueError:
        inject = None
    if not isinstance(inject, dict) or not set(inject) <= {"raise", "raise_once", "nan", "oom"}:
        raise UserError("TUNE_CIFAR_INJECT must be JSON like {\"raise\": {\"1\": 2}, \"nan\": {\"2\": 1}}")
    return inject


def split_config(config: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any]]:
    """Tune's flat config -> (TrainConfig, extras). Extras start with '_': the K-fold candidate and
    fold (`_candidates[_candidate]` holds its hyper-parameters), fault injection."""
    extras = {k: v for k, v in config.items() if k.startswith("_")}
    values = {k: v for k, v in candidate_values(config).items() if k in CONFIG_KEYS}
    cfg = TrainConfig.from_dict(values, where="trial config")
    return cfg, extras


def trial_index() -> int:
    """1, 2, 3, ... in the order Tune created the trials (read back from tuners.trial_dirname's folder)."""
    return trial_number(tune.get_context().get_trial_dir())


@contextmanager
def nan_outputs_from(first_round: int | None, rounds_done: list[int]):
    """Fault injection: from `first_round` on, every module in training mode outputs NaN, as a real
    divergence would (a global forward hook, removed on exit; eval-mode passes stay clean so cached
    frozen features are never poisoned)."""
    if first_round is None:
        yield
        return

    def poison(module, _inputs, output):
        if module.training and len(rounds_done) + 1 >= first_round and isinstance(output, torch.Tensor):
            return output * float("nan")
        return None
    handle = torch.nn.modules.module.register_module_forward_hook(poison)
    try:
        yield
    finally:
        handle.remove()


def now_iso() -> str:
    """The time now as ISO 8601 with the local offset, to the millisecond."""
    return datetime.now().astimezone().isoformat(timespec="milliseconds")


def placement(cfg: TrainConfig, gpu_ids: list, cuda_available: bool, cpus: float) -> tuple[TrainConfig, dict[str, str]]:
    """(the config to train with, what the trial reports about where it runs).

    `gpu_ids` are the GPUs Ray assigned (and put into CUDA_VISIBLE_DEVICES, so this process sees them
    as cuda:0, ...). Without a working CUDA the trial trains on the CPU, whatever it was given, with
    one thread per CPU it was given (a GPU trial's config leaves threads to the GPU: None)."""
    ids = ",".join(str(i) for i in gpu_ids)
    if cuda_available and cfg.device != "cpu":
        dev = "cuda:0" if cfg.device in ("auto", "cuda") else cfg.device
        used = f"{dev} ({torch.cuda.get_device_name(dev)}" + (f"; GPU ids {ids})" if ids else ")")
        return cfg, {"gpu_ids": ids, "device_used": used}
    changes: dict[str, Any] = {}
    if cfg.device != "cpu":
        changes["device"] = "cpu"           # "auto" would pick the CPU too; an explicit "cuda" cannot run
    if cfg.threads is None:
        changes["threads"] = max(1, int(cpus))
    if cfg.device == "cpu":
        used = "cpu" + (f" (assigned GPU ids {ids})" if ids else "")
    else:
        used = "cpu (no CUDA" + (f"; assigned GPU ids {ids})" if ids else ")")
    return (cfg.replace(**changes) if changes else cfg), {"gpu_ids": ids, "device_used": used}


def trial_placement(cfg: TrainConfig) -> tuple[TrainConfig, dict[str, str]]:
    """`placement` with this Ray worker's facts, and the CUDA_VISIBLE_DEVICES Ray set from its GPU ids."""
    cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1.0)
    cfg, where = placement(cfg, ray.get_gpu_ids(), torch.cuda.is_available(), cpus)
    return cfg, {**where, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "")}


def run_trial(config: dict[str, Any]) -> None:
    started = now_iso()
    cfg, extras = split_config(config)
    cfg, where = trial_placement(cfg)
    fold = fold_of(extras)
    data = device_data(cfg, None if fold is None else Fold(fold.split, fold.k, fold.repeats, cfg.split_seed))

    resume, ray_round = None, 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
            meta = Path(d) / META_FILE
            if meta.is_file():                # a retry: the trial started with its first attempt
                started = json.loads(meta.read_text()).get("started_at", started)
            mended = Path(d) / MENDED_FILE
            ray_round = json.loads(mended.read_text())["ray_round"] if mended.is_file() else len(resume["history"])
    when = {"started_at": started}

    inject = extras.get("_inject") or {}
    me = trial_index()
    raise_at = inject.get("raise", {}).get(str(me))           # fails on every attempt
    if resume is None:
        raise_at = inject.get("raise_once", {}).get(str(me), raise_at)   # fails on the first only
    oom_at = inject.get("oom", {}).get(str(me))
    node = f"{ray.util.get_node_ip_address()}/{ray.get_runtime_context().get_node_id()[:8]}"
    rounds_done: list[int] = list(range(len(resume["history"]))) if resume else []
    reported = [ray_round]          # the last round Ray knows of (the OOM report comes after it)

    def report(record: dict[str, Any], state: dict[str, Any] | None) -> None:
        # fit() already reports val_acc = 0.0 for a diverged round; add where and when the trial runs.
        # training_iteration is the round itself, not Ray's count since its restore: the two differ
        # when --resume continued from a newer checkpoint than the one Ray had named (checkpoint_mend).
        metrics = dict(record, training_iteration=record["round"], node=node, **when, reported_at=now_iso(), **where)
        if state is None:
            tune.report(metrics)
        else:
            with tempfile.TemporaryDirectory() as d:
                torch.save(state, os.path.join(d, STATE_FILE))
                Path(d, META_FILE).write_text(json.dumps(when))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
        reported[0] = record["round"]

    # Restored from a mended checkpoint: the rounds it holds beyond what Ray knew are told to Ray (and
    # so to ASHA and the searcher) again, the last with the checkpoint, before training goes on.
    missed = [h for h in resume["history"] if h["round"] > ray_round] if resume else []
    for i, record in enumerate(missed):
        report(dict(record, status="running"), resume if i == len(missed) - 1 else None)

    def on_round(record: dict[str, Any], state) -> None:
        rounds_done.append(record["round"])
        if raise_at is not None and record["round"] >= raise_at:
            raise InjectedFault(f"injected fault in trial {me} at round {raise_at}")
        if oom_at is not None and record["round"] >= oom_at:
            raise torch.cuda.OutOfMemoryError(f"injected out-of-memory in trial {me}")
        report(record, state())

    try:
        with nan_outputs_from(inject.get("nan", {}).get(str(me)), rounds_done):
            fit(cfg, data, on_round=on_round, resume=resume)
    except torch.cuda.OutOfMemoryError:
        # Retrying would run out of memory again: record it with the way out, let the search go on.
        tune.report({"val_acc": FAILED_VALUE, "status": "oom", "training_iteration": reported[0] + 1,
                     "precision_used": Runtime.of(cfg).precision_used, "node": node, **when,
                     "reported_at": now_iso(), **where,
                     "error": f"CUDA out of memory at batch_size={cfg.batch_size}: use a smaller batch size "
                              "or a larger --gpus-per-trial (fewer trials per GPU)"})
