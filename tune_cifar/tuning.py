"""What search and kfold share: checking resources, the Ray session, running or resuming a Tuner,
and reading its trials back as rows.

Ray is imported inside functions only, so `--help` and input validation stay fast and nothing Ray
starts before the input has been checked.
"""
from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import UserError
from .results import RAY_DIR

EXPOSED_DASHBOARD_WARNING = (
    "warning: the Ray dashboard on {host} is reachable from the network: anyone who reaches it can "
    "run code on this machine (CVE-2023-48022, 'ShadowRay'); prefer 127.0.0.1 and an SSH tunnel")


@dataclass
class RayOptions:
    address: str | None = None          # None: start an embedded local Ray; 'auto' or HOST:PORT: join
    dashboard: bool = False
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = 8265
    storage: str | None = None          # where Tune writes; None = the experiment folder


@dataclass
class Phases:
    """Wall-clock time per phase of a command, reported in best.json and on stdout."""
    started: float

    def __post_init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._mark = self.started

    def done(self, phase: str) -> None:
        now = time.time()
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + now - self._mark, 2)
        self._mark = now

    def elapsed(self) -> float:
        return time.time() - self.started


def gpus_present() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def trial_resources(gpu: float, cpu: float) -> dict[str, float]:
    """Per-trial Ray resources: the GPU fraction only where GPUs exist (else trials run on the CPU)."""
    from .spaces import Resources, check_resources
    n = gpus_present()
    check_resources(Resources(gpu=gpu, cpu=cpu), "resources.", gpus_present=n)
    cores = os.cpu_count() or 1
    if cpu > cores:
        raise UserError(f"resources.cpu={cpu} is more than the {cores} CPU cores present")
    return {"cpu": cpu, "gpu": gpu if n else 0}


def threads_for(resources: dict[str, float]) -> int:
    return max(1, int(resources["cpu"]))


def start_ray(opts: RayOptions) -> dict[str, Any]:
    """Join a cluster (--address / RAY_ADDRESS), reuse the Ray this process already runs, or start an
    embedded local Ray; returns its facts ("started": whether stop_ray should shut it down)."""
    import ray

    if opts.dashboard and opts.dashboard_host not in ("127.0.0.1", "localhost", "::1"):
        print(EXPOSED_DASHBOARD_WARNING.format(host=opts.dashboard_host), file=sys.stderr, flush=True)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")   # CSV + JSON only: result_loggers()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    address = opts.address or os.environ.get("RAY_ADDRESS")
    started = not ray.is_initialized()
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if not started:
        ctx = None
    elif address:
        ctx = ray.init(address=address, **kwargs)
    else:
        kwargs.update(include_dashboard=opts.dashboard, dashboard_host=opts.dashboard_host,
                      dashboard_port=opts.dashboard_port)
        ctx = ray.init(**kwargs)
    url = getattr(ctx, "dashboard_url", None)
    if opts.dashboard and url:
        print(f"Ray dashboard: http://{url}", flush=True)
    resources = ray.cluster_resources()
    return {"address": address or "local", "started": started,
            "dashboard_url": f"http://{url}" if url else None,
            "nodes": len([n for n in ray.nodes() if n.get("Alive")]),
            "cpus": resources.get("CPU", 0), "gpus": resources.get("GPU", 0)}


def result_loggers() -> list:
    """progress.csv + result.json per trial (what --resume and trials.csv read); no TensorBoard."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    return [CSVLoggerCallback(), JsonLoggerCallback()]


def stop_ray(facts: dict[str, Any] | None) -> None:
    """Shut down the Ray this command started (not one it joined or found running)."""
    import ray
    if facts is None or facts.get("started"):
        ray.shutdown()


def tune_path(exp: Path, opts: RayOptions) -> str:
    return f"{opts.storage.rstrip('/')}/{exp.name}" if opts.storage else str(exp.resolve())


def run_tuner(make_tuner, exp: Path, opts: RayOptions, trainable, resume: bool):
    """A fresh Tuner, or Tuner.restore of the interrupted one (finished trials are not run again)."""
    from ray import tune

    if resume:
        path = f"{tune_path(exp, opts)}/{RAY_DIR}"
        if not tune.Tuner.can_restore(path):
            raise UserError(f"--resume: {path} holds no Ray Tune state to continue")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False)
    else:
        tuner = make_tuner()
    return tuner.fit()


def last_line(error: BaseException | None) -> str:
    """The useful line of a (Ray-wrapped) exception: its last non-empty line."""
    if error is None:
        return ""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]


def trial_rows(results, searched: list[str], max_rounds: int | None) -> tuple[list[dict], list[dict]]:
    """(one row per trial, one row per trial x round) from a ResultGrid.

    status: completed | stopped (by ASHA or the time budget) | early_stopped (patience) | diverged
            | oom | error (raised more often than --max-failures allows)
    """
    import pandas as pd

    rows, history = [], []
    for result in results:
        cfg = result.config or {}
        df = result.metrics_dataframe if result.metrics_dataframe is not None else pd.DataFrame()
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path or "?").name
        rounds = int(metrics.get("training_iteration") or 0)
        status = metrics.get("status", "running")
        if result.error is not None:
            status = "error"
        elif status == "running":
            status = "completed" if max_rounds is not None and rounds >= max_rounds else "stopped"
        vals = df["val_acc"].dropna() if "val_acc" in df else pd.Series(dtype=float)
        name = Path(result.path or "").name                   # trial_<n>_<id>, see trainable.trial_dirname
        number = int(name.split("_")[1]) if name.startswith("trial_") and name.split("_")[1].isdigit() else None
        row = {"trial": number, "trial_id": trial_id, "status": status}
        row.update({k: cfg.get(k) for k in searched})
        row.update({"best_val_acc": float(vals.max()) if len(vals) else None,
                    "last_val_acc": float(vals.iloc[-1]) if len(vals) else None,
                    "last_val_loss": metrics.get("val_loss"),
                    "epochs": metrics.get("epoch", 0.0) if status != "error" else (
                        float(df["epoch"].iloc[-1]) if "epoch" in df and len(df) else 0.0),
                    "rounds": rounds, "seconds": round(float(metrics.get("time_total_s") or 0.0), 2),
                    "node": metrics.get("node_ip", ""), "error": metrics.get("error") or last_line(result.error),
                    "path": result.path})
        rows.append(row)
        keep = [c for c in ("training_iteration", "round", "epoch", "train_loss", "train_acc", "val_loss",
                            "val_acc", "lr", "seconds", "images_per_s", "time_total_s", "node_ip")
                if c in df.columns]
        for rec in df[keep].to_dict("records"):
            history.append({"trial_id": trial_id, **rec})
    rows.sort(key=lambda r: (r["trial"] is None, r["trial"] or 0))
    return rows, history
