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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..core.config import TrainConfig, UserError
from ..results.folders import RAY_DIR, command_line, read_json, start_experiment, write_json, write_yaml
from .ray_session import RayOptions, start_ray, stop_ray, threads_for, trial_resources

TIME_RESERVE = (15.0, 0.02)     # seconds + share of --time-budget kept for the test, report, shut-down


@dataclass
class RunOptions:
    """The flags search and kfold share."""
    results_dir: Path = Path("results")
    name: str | None = None
    data_dir: str | None = None
    subset: int | None = None
    download: bool = False
    offline: bool = False
    weights: str | None = None
    gpus_per_trial: float | None = None
    cpus_per_trial: float | None = None
    seed: int = 0
    max_failures: int = 2
    time_budget: float | None = None
    resume: bool = False
    overwrite: bool = False
    command: str | None = None          # the command that was run (None: this process's argv)
    verbose: bool = False               # Ray's own output (and worker logs) instead of the live view
    tensorboard: bool = True            # event files per trial (loggers.py)
    mlflow: str | None = None           # tracking URI; "" = SQLite under results/EXP/mlruns (loggers.py)
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


@dataclass
class Plan:
    """Everything `run` needs; built and checked by search.py / kfold.py before anything is written."""
    exp: Path
    opts: RunOptions
    spec_record: dict[str, Any]                 # spec.yaml (plus the command)
    plan_record: dict[str, Any]                 # plan.json: the single source of truth on --resume
    resources: dict[str, float]
    time_budget: float | None
    phase: str                                  # what the Tuner's time is called in the phases
    make_tuner: Callable[[Any, float | None], Any]          # (trainable, seconds left) -> fresh Tuner
    write_results: Callable[[Any, Phases, dict[str, Any]], dict[str, Any]]   # (ResultGrid, ...) -> summary
    summary_file: str                           # best.json / kfold_summary.json


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
    start_experiment(exp, overwrite=opts.overwrite, storage=tune_path(exp, opts.ray))
    if not opts.resume:
        write_yaml(exp / "spec.yaml", {"command": opts.command or command_line(), **plan.spec_record})
        write_json(exp / "plan.json", plan.plan_record)
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
            results = run_tuner(lambda: plan.make_tuner(trainable, seconds), exp, opts, trainable, output.callbacks)
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
        kind = plan.plan_record.get("kind", "search")
        if kind == "kfold":   # rows are (configuration, fold): the keys the configurations set
            params = sorted({k for c in plan.plan_record.get("candidates", []) for k in c})
        else:
            params = list(plan.spec_record.get("space", {}))
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
            self.mlflow = MLflowRuns(opts.mlflow, exp, kind, constants_of(plan.plan_record), opts.resume)
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


def prepare_base(spec, opts: RunOptions, where: str, **changes: Any) -> tuple[TrainConfig, dict[str, Any], str]:
    """Check the flags search and kfold share, find the data, and pin the config every trial starts
    from: (config, per-trial resources, absolute data folder). Nothing is written or started.

    --gpus-per-trial auto is decided here, once the data is found (`gpu_share.plan_share`: one
    measured training step of the space's heaviest trial on the first GPU; 0 without a GPU), printed,
    and recorded in the resources as "gpu_share" (so plan.json and best.json keep it)."""
    from ..data.cache import check_data
    from ..data.sources import downloads_allowed, resolve_data_dir
    from ..training.models import check_weights

    if opts.subset is not None and opts.subset < 1:
        raise UserError(f"--subset={opts.subset} must be positive")
    if opts.max_failures < 0:
        raise UserError(f"--max-failures={opts.max_failures} must be >= 0 (Ray would retry forever)")
    auto = opts.gpus_per_trial == "auto"
    resources: dict[str, Any] = trial_resources(None if auto else opts.gpus_per_trial, opts.cpus_per_trial,
                                                spec.resources, opts.ray)
    download = downloads_allowed(opts.download, opts.offline)
    data_dir = resolve_data_dir(opts.data_dir, download)
    values: dict[str, Any] = {"data_dir": data_dir, "download": False, **changes}
    if opts.weights:
        values["weights"] = str(Path(opts.weights).resolve())
    else:
        values["download"] = download     # ImageNet weights: torchvision's cache, else downloaded
    base = spec.base.replace(**values)
    base.check(where)
    if opts.subset is None and base.subset is not None:      # a preset's subset (--quick), not the user's
        base = fit_preset_subset(base)
    check_data(base)
    check_weights(base)
    if auto:
        from ..training.gpu_share import plan_share
        from .ray_session import gpus_present
        share = plan_share(spec, base, gpus_present(), opts.ray.joins_cluster())
        print(f"--gpus-per-trial auto: {share['note']}", flush=True)
        if share["gpus_per_trial"]:
            resources = trial_resources(share["gpus_per_trial"], opts.cpus_per_trial, spec.resources, opts.ray)
        resources["gpu_share"] = share
    if "threads" not in changes:
        base = base.replace(threads=threads_for(resources) if not resources["gpu"] else None)
    return base, resources, data_dir


def fit_preset_subset(base: TrainConfig) -> TrainConfig:
    """--quick's subset capped at the data's training images, with a note (core/fitting.py)."""
    from ..core.fitting import fit_subset
    from ..data.cache import training_labels
    subset, note = fit_subset(base.subset, len(training_labels(base)))
    if note:
        print(note, flush=True)
    return base.replace(subset=subset)


def recorded_options(opts: RunOptions) -> dict[str, Any]:
    """The options as plan.json records them (what a --resume re-imposes)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()
            if k not in ("ray", "started", "command", "resume", "overwrite")}


def reopen(name: str | None, opts: RunOptions, default_name: str, plan_flags: tuple[str, ...]):
    """An interrupted experiment's saved plan: (folder, plan.json, its spec, the options with the
    plan's flags re-imposed). `name`, the space the command names (if any), must be the one it was
    planned from, and flags given again must agree with the plan."""
    import dataclasses

    from ..results.folders import experiment_dir
    from ..core.spaces import SearchSpec
    exp = experiment_dir(opts.results_dir, opts.name or default_name, resume=True)
    saved = read_json(exp / "plan.json")
    spec = SearchSpec.from_dict(saved["spec"], where=str(exp / "plan.json"))
    if name is not None:
        check_same_space(name, spec, exp)
    check_flags_agree(opts, saved["options"], plan_flags, exp)
    opts = dataclasses.replace(opts, **{k: v for k, v in saved["options"].items() if k in plan_flags})
    return exp, saved, spec, opts


def check_same_space(name: str, spec, exp: Path) -> None:
    """On --resume, NAME must be the space the experiment was planned from (its saved copy is used)."""
    from ..core.spaces import find_space
    if Path(spec.source).resolve() != find_space(name).resolve():
        raise UserError(f"--resume: {exp} was planned from {spec.source}, not {find_space(name)}")


def check_flags_agree(opts: RunOptions, saved: dict[str, Any], keys: tuple[str, ...], exp: Path) -> None:
    """On --resume a flag given again must say what the saved plan says (a default is not 'given')."""
    defaults = type(opts)()
    for key in keys:
        given = getattr(opts, key)
        if given == getattr(defaults, key) or key not in saved:
            continue
        if key == "data_dir" and Path(given).resolve() == Path(saved[key]).resolve():
            continue
        if key == "weights" and saved[key] and Path(given).resolve() == Path(saved[key]).resolve():
            continue
        if given != saved[key]:
            flag = "--" + key.replace("_", "-")
            raise UserError(f"--resume: {flag} {given} contradicts the saved plan of {exp} ({key}={saved[key]}); "
                            "leave it out to continue as planned")


def run_config(exp: Path, opts: RunOptions, callbacks: list | tuple = ()):
    """Tune's run settings for an experiment: its storage, retries of crashing trials from their last
    checkpoint, one checkpoint kept per trial, and progress.csv + result.json per trial (what --resume
    and trials.csv read), plus the caller's own callbacks. What is shown and the TensorBoard / MLflow
    loggers are added by run_tuner (add_output)."""
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    return tune.RunConfig(name=RAY_DIR, storage_path=tune_path(exp, opts.ray), verbose=1 if opts.verbose else 0,
                          callbacks=[CSVLoggerCallback(), JsonLoggerCallback(), *callbacks],
                          failure_config=tune.FailureConfig(max_failures=opts.max_failures),
                          checkpoint_config=tune.CheckpointConfig(num_to_keep=1))


def tune_path(exp: Path, opts: RayOptions) -> str:
    """Where Ray Tune keeps this experiment: --storage (a shared folder or a URI such as s3://...)
    when every node must reach it, else the experiment folder itself."""
    if not opts.storage:
        return str(exp.resolve())
    # a stage inside an experiment (search --cv-top's cv/) is kept apart from every other one's
    name = f"{exp.parent.name}/{exp.name}" if (exp.parent / "plan.json").exists() else exp.name
    if "://" in opts.storage:
        return f"{opts.storage.rstrip('/')}/{name}"
    return str(Path(opts.storage).resolve() / name)


def run_tuner(make_tuner, exp: Path, opts: RunOptions, trainable, callbacks: list | tuple = ()):
    """A fresh Tuner, or Tuner.restore of the interrupted one (finished trials are not run again),
    run with this command's output `callbacks` (add_output)."""
    from ray import tune

    from .checkpoint_mend import mend_missing_checkpoints

    if opts.resume:
        path = f"{tune_path(exp, opts.ray)}/{RAY_DIR}"
        if not tune.Tuner.can_restore(path):
            raise UserError(f"--resume: {path} holds no Ray Tune state to continue")
        mend_missing_checkpoints(path)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False)
    else:
        tuner = make_tuner()
    add_output(tuner, callbacks, opts.verbose)
    return tuner.fit()


def add_output(tuner, callbacks: list | tuple, verbose: bool) -> None:
    """This command's output callbacks and verbosity on a Tuner made or restored. Not through
    run_config(): a Tuner pickles its RunConfig into tuner.pkl when it is made, and Tuner.restore
    brings that copy back and takes no other, but what is shown and logged belongs to the command
    running now (a --resume may add --mlflow, or run without a terminal). Appended last, so the
    callbacks Tune saved state for keep their places (CallbackList.set_state goes by position).
    Tuner has no public setter: _local_tuner is its TunerInternal (absent under Ray Client)."""
    internal = getattr(tuner, "_local_tuner", None)
    if internal is None:
        return
    rc = internal.get_run_config()
    rc.callbacks = [*(rc.callbacks or []), *callbacks]
    rc.verbose = 1 if verbose else 0


def time_reserve(time_budget: float) -> float:
    """Seconds of a --time-budget kept back from the trials for the test, the report and shut-down."""
    return TIME_RESERVE[0] + TIME_RESERVE[1] * time_budget


def check_time_budget(time_budget: float | None, where: str = "--time-budget") -> None:
    if time_budget is not None and not time_budget > time_reserve(time_budget):
        raise UserError(f"{where}={time_budget:g}: must be more than the {time_reserve(time_budget):.0f}s kept "
                        "for the test, the report and shut-down")


def print_phases(phases: Phases, time_budget: float | None = None) -> None:
    print("time per phase: " + ", ".join(f"{k} {v:.0f}s" for k, v in phases.seconds.items())
          + f"; total {phases.elapsed():.0f}s" + (f" of a {time_budget:g}s budget" if time_budget else ""))
