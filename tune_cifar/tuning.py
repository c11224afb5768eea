"""What search and kfold share: checking resources, the Ray session, running or resuming a Tuner,
and reading its trials back as rows.

Ray is imported inside functions only, so `--help` and input validation stay fast and nothing Ray
starts before the input has been checked.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import TrainConfig, UserError
from .results import RAY_DIR, command_line, start_experiment, write_json, write_yaml

SUCCEEDED = ("completed", "stopped", "early_stopped")    # trial statuses that end with a usable val_acc
TIME_RESERVE = (15.0, 0.02)     # seconds + share of --time-budget kept for the test, report, shut-down
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
class RunOptions:
    """The flags search and kfold share."""
    results_dir: Path = Path("results")
    name: str | None = None
    data_dir: str | None = None
    subset: int | None = None
    download: bool = False
    weights: str | None = None
    gpus_per_trial: float | None = None
    cpus_per_trial: float | None = None
    seed: int = 0
    max_failures: int = 2
    time_budget: float | None = None
    resume: bool = False
    overwrite: bool = False
    report: bool = True
    ray: RayOptions = field(default_factory=RayOptions)
    started: float = field(default_factory=time.time)


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


def exposed_dashboard_warning(opts: RayOptions) -> str | None:
    if opts.dashboard and opts.dashboard_host not in ("127.0.0.1", "localhost", "::1"):
        return EXPOSED_DASHBOARD_WARNING.format(host=opts.dashboard_host)
    return None


def resolve_data_dir(data_dir: str | None, download: bool) -> str:
    """Find the data now (a clear error before Ray starts) and pin its absolute path for the workers."""
    from .data import candidate_dirs, detect_layout, load_cifar10
    for _, root in candidate_dirs(data_dir):
        if detect_layout(root):
            return str(root.resolve())
    return load_cifar10(data_dir, download).source      # downloads, or raises the clear error


def check_gpu_request(gpus_per_trial: float | None, ray_opts: RayOptions) -> None:
    """An explicit --gpus-per-trial on a machine without GPUs is a mistake (a space file's default
    GPU share is simply not used there). On a cluster, the GPUs may be on other nodes."""
    if gpus_per_trial is not None and gpus_per_trial > 0 and not gpus_present() \
            and not (ray_opts.address or os.environ.get("RAY_ADDRESS")):
        raise UserError(f"--gpus-per-trial {gpus_per_trial:g}: no GPU is visible on this machine "
                        "(trials run on the CPU without the flag)")


def check_data(cfg: TrainConfig) -> None:
    from .data import check_subset, training_labels
    check_subset(cfg.subset, training_labels(cfg))


def check_weights(cfg: TrainConfig) -> None:
    if cfg.mode != "scratch":
        from .models import build_model
        build_model(cfg.model, cfg.mode, 10, cfg.width, cfg.weights, cfg.download)


def fault_injection() -> dict[str, Any]:
    """TUNE_CIFAR_INJECT='{"raise": {"1": 2}, "nan": {"2": 1}}': the first trial raises at round 2 on
    every attempt, the second trial's loss turns NaN at round 1 ("raise_once" fails only the first attempt,
    "oom" raises CUDA's out-of-memory error).
    For testing the search's resilience; never set in normal use."""
    raw = os.environ.get("TUNE_CIFAR_INJECT")
    if not raw:
        return {}
    try:
        inject = json.loads(raw)
        assert isinstance(inject, dict) and set(inject) <= {"raise", "raise_once", "nan", "oom"}
        return inject
    except (ValueError, AssertionError):
        raise UserError("TUNE_CIFAR_INJECT must be JSON like {\"raise\": {\"1\": 2}, \"nan\": {\"2\": 1}}") from None


def prepare_base(spec, opts: RunOptions, where: str, **changes: Any) -> tuple[TrainConfig, dict[str, float], str]:
    """Check the flags search and kfold share, find the data, and pin the config every trial starts
    from: (config, per-trial resources, absolute data folder). Nothing is written or started."""
    if opts.subset is not None and opts.subset < 1:
        raise UserError(f"--subset={opts.subset} must be positive")
    check_gpu_request(opts.gpus_per_trial, opts.ray)
    resources = trial_resources(opts.gpus_per_trial if opts.gpus_per_trial is not None else spec.resources.gpu,
                                opts.cpus_per_trial if opts.cpus_per_trial is not None else spec.resources.cpu)
    data_dir = resolve_data_dir(opts.data_dir, opts.download)
    values: dict[str, Any] = {"data_dir": data_dir, "download": False,
                              "threads": threads_for(resources) if not resources["gpu"] else None, **changes}
    if opts.weights:
        values["weights"] = str(Path(opts.weights).resolve())
    base = spec.base.replace(**values)
    base.check(where)
    check_data(base)
    check_weights(base)
    return base, resources, data_dir


def start_ray(opts: RayOptions) -> dict[str, Any]:
    """Join a cluster (--address / RAY_ADDRESS), reuse the Ray this process already runs, or start an
    embedded local Ray; returns its facts ("started": whether stop_ray should shut it down)."""
    import ray

    warning = exposed_dashboard_warning(opts)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")   # CSV + JSON only: run_config()
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


def run_config(exp: Path, opts: RunOptions):
    """Tune's run settings for an experiment: its storage, retries of crashing trials from their last
    checkpoint, one checkpoint kept per trial, and progress.csv + result.json per trial (what --resume
    and trials.csv read; no TensorBoard logger)."""
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    return tune.RunConfig(name=RAY_DIR, storage_path=tune_path(exp, opts.ray), verbose=1,
                          callbacks=[CSVLoggerCallback(), JsonLoggerCallback()],
                          failure_config=tune.FailureConfig(max_failures=opts.max_failures),
                          checkpoint_config=tune.CheckpointConfig(num_to_keep=1))


def stop_ray(facts: dict[str, Any] | None) -> None:
    """Shut down the Ray this command started (not one it joined or found running)."""
    import ray
    if facts is None or facts.get("started"):
        ray.shutdown()


def tune_path(exp: Path, opts: RayOptions) -> str:
    """Where Ray Tune keeps this experiment: --storage (a shared folder or a URI such as s3://...)
    when every node must reach it, else the experiment folder itself."""
    if not opts.storage:
        return str(exp.resolve())
    if "://" in opts.storage:
        return f"{opts.storage.rstrip('/')}/{exp.name}"
    return str(Path(opts.storage).resolve() / exp.name)


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


def time_reserve(time_budget: float) -> float:
    """Seconds of a --time-budget kept back from the trials for the test, the report and shut-down."""
    return TIME_RESERVE[0] + TIME_RESERVE[1] * time_budget


def check_time_budget(time_budget: float | None, where: str = "--time-budget") -> None:
    if time_budget is not None and time_budget <= time_reserve(time_budget):
        raise UserError(f"{where}={time_budget:g}: must be more than the {time_reserve(time_budget):.0f}s kept "
                        "for the test, the report and shut-down")


def tune_experiment(exp: Path, opts: RunOptions, spec: dict[str, Any], plan: dict[str, Any], make_tuner,
                    trainable, time_budget: float | None, phase: str):
    """The part of a search or kfold run that Ray does: create (or reopen, with --resume) the experiment
    folder, write spec.yaml and plan.json once, start Ray, run or restore the Tuner within what is left
    of --time-budget, stop Ray. make_tuner(seconds) builds a fresh Tuner. Returns the ResultGrid, Ray's
    facts and the phases so far."""
    phases = Phases(opts.started)
    start_experiment(exp, overwrite=opts.overwrite)
    if not opts.resume:
        write_yaml(exp / "spec.yaml", {"command": command_line(), **spec})
        write_json(exp / "plan.json", plan)
    phases.done("validate")
    ray_facts = start_ray(opts.ray)
    phases.done("ray_start")
    seconds = None
    if time_budget is not None:
        seconds = time_budget - phases.elapsed() - time_reserve(time_budget)
        if seconds <= 0:
            stop_ray(ray_facts)
            raise UserError(f"--time-budget {time_budget:g}s is used up before the trials start "
                            f"({phases.elapsed():.0f}s for start-up, {time_reserve(time_budget):.0f}s kept "
                            "for the results)")
    try:
        results = run_tuner(lambda: make_tuner(seconds), exp, opts.ray, trainable, opts.resume)
        phases.done(phase)
    finally:
        stop_ray(ray_facts)
    return results, ray_facts, phases


def print_phases(phases: Phases, time_budget: float | None = None) -> None:
    print("time per phase: " + ", ".join(f"{k} {v:.0f}s" for k, v in phases.seconds.items())
          + f"; total {phases.elapsed():.0f}s" + (f" of a {time_budget:g}s budget" if time_budget else ""))


def last_line(error: BaseException | None) -> str:
    """The useful line of a (Ray-wrapped) exception: its last non-empty line."""
    if error is None:
        return ""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]


def ranked_trials(trials):
    """The rows of trials.csv that finished with a validation accuracy, best first; of equals, the one
    trained longer (what best.json, --from-search and the report call the best)."""
    ok = trials[trials["status"].isin(SUCCEEDED)].dropna(subset=["last_val_acc"])
    return ok.sort_values(["last_val_acc", "rounds"], ascending=False)


def trial_rows(results, searched: list[str], max_rounds: int | None) -> tuple[list[dict], list[dict]]:
    """(one row per trial, one row per trial x round) from a ResultGrid.

    status: completed | stopped (by ASHA or the time budget) | early_stopped (patience) | diverged
            | oom | error (raised more often than --max-failures allows) | not_run (no round before the end)
    """
    import pandas as pd

    from .trainable import trial_number
    rows, history = [], []
    for result in results:
        cfg = result.config or {}
        df = result.metrics_dataframe if result.metrics_dataframe is not None else pd.DataFrame()
        if "training_iteration" in df:
            # After a --resume, Tune re-runs the rounds a trial reported after its last snapshot of the
            # experiment and appends them to progress.csv again: keep the run that led to the result.
            df = df.drop_duplicates("training_iteration", keep="last").sort_values("training_iteration")
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path or "?").name
        rounds = int(metrics.get("training_iteration") or 0)
        status = metrics.get("status", "running")
        if result.error is not None:
            status = "error"
        elif rounds == 0:
            status = "not_run"          # cut by the time budget (or an interruption) before its first round
        elif status == "running":
            status = "completed" if max_rounds is not None and rounds >= max_rounds else "stopped"
        vals = df["val_acc"].dropna() if "val_acc" in df else pd.Series(dtype=float)
        row = {"trial": trial_number(result.path), "trial_id": trial_id, "status": status}
        row.update({k: cfg.get(k) for k in searched})
        row.update({"best_val_acc": float(vals.max()) if len(vals) else None,
                    "last_val_acc": float(vals.iloc[-1]) if len(vals) else None,
                    "last_val_loss": metrics.get("val_loss"),
                    "epochs": metrics.get("epoch", 0.0) if status != "error" else (
                        float(df["epoch"].iloc[-1]) if "epoch" in df and len(df) else 0.0),
                    "rounds": rounds, "seconds": round(float(metrics.get("time_total_s") or 0.0), 2),
                    "node": metrics.get("node") or metrics.get("node_ip", ""),
                    "error": metrics.get("error") or last_line(result.error),
                    "path": result.path})
        rows.append(row)
        keep = [c for c in ("training_iteration", "round", "epoch", "train_loss", "train_acc", "val_loss",
                            "val_acc", "lr", "seconds", "images_per_s", "time_total_s", "node_ip")
                if c in df.columns]
        for rec in df[keep].to_dict("records"):
            history.append({"trial_id": trial_id, **rec})
    rows.sort(key=lambda r: (r["trial"] is None, r["trial"] or 0))
    return rows, history
