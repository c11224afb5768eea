"""The one experiment runner that search and kfold share.

A command builds a `Plan` (what to write as spec.yaml and plan.json, the per-trial resources, how to
build a fresh Tuner, how to turn its ResultGrid into result files); `run(plan)` then creates the
folder (or reopens it on --resume), writes the plan once, starts Ray, runs or restores the Tuner
within what is left of the time budget, stops Ray, writes the results, and (through the `report`
callable the CLI passes in, so this module never imports the report) makes the report.

Ray is imported inside functions only: planning, which checks every input, starts nothing.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from ..core.config import UserError
from ..results.folders import command_line, read_json, start_experiment, write_json, write_yaml
from .plan import Phases, Plan, time_reserve
from .ray_session import start_ray, stop_ray
from .tuners import make_tuner, run_tuner, tune_path


def run(plan: Plan, report: Callable[[Path], Any] | None = None) -> dict[str, Any]:
    """Run or resume the experiment of `plan`; returns the summary written to plan.summary_file."""
    from ray import tune

    from .live_view import quiet_ray
    from .trainable import run_trial

    opts, exp = plan.opts, plan.exp
    if opts.resume and (exp / plan.summary_file).exists():    # finished: its test is not run again
        print(f"{exp}: already finished ({plan.summary_file})")
        return read_json(exp / plan.summary_file)
    phases = Phases(opts.started)
    if opts.mlflow is not None:
        from .loggers import check_mlflow
        check_mlflow()                  # a missing package is bad input: before anything is written
    start_experiment(exp, overwrite=opts.overwrite, storage=tune_path(exp, opts.ray), resume=opts.resume)
    if not opts.resume:
        write_yaml(exp / "spec.yaml", {"command": opts.command or command_line(), **plan.spec_record()})
        write_json(exp / "plan.json", plan.record())
    phases.done("validate")
    with quiet_ray(opts.verbose):
        ray_facts = start_ray(opts.ray)
        phases.done("ray_start")
        try:
            resources = fit_to_cluster(plan.resources, ray_facts, explicit_gpu=opts.gpus_per_trial is not None)
        except UserError:
            stop_ray(ray_facts)
            raise
        trainable = tune.with_resources(run_trial, resources)
        seconds = None
        if plan.time_budget is not None:
            seconds = plan.time_budget - phases.elapsed() - time_reserve(plan.time_budget)
            if seconds <= 0:
                stop_ray(ray_facts)
                raise UserError(f"--time-budget {plan.time_budget:g}s is used up before the trials start "
                                f"({phases.elapsed():.0f}s for start-up, {time_reserve(plan.time_budget):.0f}s kept "
                                "for the results)")
        output = None
        try:
            output = Output(plan, seconds)
            results = run_tuner(lambda: make_tuner(plan, trainable, seconds), exp, opts, trainable, output.callbacks)
            phases.done(plan.phase)
        except BaseException as e:
            if output is not None:
                output.close("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        finally:
            stop_ray(ray_facts)
    try:
        summary = plan.write_results(results, phases, ray_facts)
        if report is not None:
            report(exp)
            phases.done("report")
        summary.update(phases=phases.seconds, wall_s=round(phases.elapsed(), 1))
        write_json(exp / plan.summary_file, summary)
    except BaseException:
        output.close("FAILED")
        raise
    output.close("FINISHED", summary)       # after the summary: the MLflow parent run gets its files
    print_phases(phases, plan.time_budget)
    return summary


class Output:
    """What a run shows and records besides its result files: the live view (live_view.py), the
    TensorBoard event files and the MLflow runs (loggers.py), as Tune callbacks."""

    def __init__(self, plan: Plan, seconds: float | None):
        from rich.console import Console

        from .live_view import LiveView

        opts, exp = plan.opts, plan.exp
        kind = plan.kind
        params = plan.trials.searched()    # kfold: rows are (configuration, fold), the keys the candidates set
        console = Console()
        self.view = LiveView(exp.name, kind, params, opts.started, plan.time_budget,
                             live=console.is_terminal and not opts.verbose, console=console,
                             deadline=time.time() + seconds if seconds is not None else None)
        self.callbacks: list = [self.view]
        where = [f"results in {exp}"]
        if opts.tensorboard:
            from .loggers import TensorBoardCallback
            self.callbacks.append(TensorBoardCallback(params))
            where.append(f"tensorboard --logdir {exp}")
        self.mlflow = None
        if opts.mlflow is not None:
            from .loggers import MLflowRuns, constants_of
            self.mlflow = MLflowRuns(opts.mlflow, exp, kind, constants_of(plan), opts.resume)
            self.callbacks.append(self.mlflow.callback(params))
            where.append(f"MLflow: {self.mlflow.uri}")
        print(f"{kind} {exp.name}: " + "; ".join(where), flush=True)

    def close(self, status: str, summary: dict[str, Any] | None = None) -> None:
        self.view.close()
        if self.mlflow is not None:
            self.mlflow.finish(summary, status)
            self.mlflow = None


def fit_to_cluster(resources: dict[str, Any], ray_facts: dict[str, Any], explicit_gpu: bool) -> dict[str, float]:
    """The per-trial resources Tune gets ({"cpu", "gpu"}; a recorded `gpu_share` decision of
    --gpus-per-trial auto is not a resource), fitted to the cluster once Ray runs: without any GPU
    there, the space file's GPU share is dropped (trials run on CPUs) and an explicit --gpus-per-trial
    is an error; a share larger than the most GPUs one node has (a trial runs on one node) is an error
    when given as a flag, else lowered to that node's count. The GPUs may all be on other nodes than
    this one: what counts is the cluster (`ray_facts["gpus"]`, and "node_gpus": GPUs per live node,
    looked up in the running Ray when the facts do not say)."""
    explicit_gpu = explicit_gpu and "gpu_share" not in resources     # auto decided it, not the user
    fitted = {"cpu": resources["cpu"], "gpu": resources["gpu"]}
    gpu = fitted["gpu"]
    if gpu and not ray_facts.get("gpus"):
        if explicit_gpu:
            raise UserError(f"--gpus-per-trial {gpu:g}: the Ray cluster at {ray_facts['address']} has no GPU")
        return {**fitted, "gpu": 0}
    if gpu:
        node_gpus = ray_facts.get("node_gpus")
        most = max(node_gpus if node_gpus is not None else live_node_gpus(), default=0)
        if most and gpu > most:
            if explicit_gpu:
                raise UserError(f"--gpus-per-trial {gpu:g}: no node of the Ray cluster at {ray_facts['address']} "
                                f"has that many GPUs (at most {most:g} on one node; a trial runs on one node)")
            print(f"note: resources.gpu={gpu:g} of the search space is more than the {most:g} GPU(s) of the "
                  f"largest node: using {most:g}", flush=True)
            fitted["gpu"] = float(most)
    return fitted


def live_node_gpus() -> list[float]:
    """GPUs of each live node of the Ray this process is connected to ([] when none runs)."""
    import ray
    if not ray.is_initialized():
        return []
    return [n.get("Resources", {}).get("GPU", 0.0) for n in ray.nodes() if n.get("Alive")]


def print_phases(phases: Phases, time_budget: float | None = None) -> None:
    print("time per phase: " + ", ".join(f"{k} {v:.0f}s" for k, v in phases.seconds.items())
          + f"; total {phases.elapsed():.0f}s" + (f" of a {time_budget:g}s budget" if time_budget else ""))
