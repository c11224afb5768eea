"""The one Tuner factory: a Plan's trials as a Ray Tune Tuner (fresh, or restored on --resume), with
the run settings every experiment shares."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.config import UserError
from ..core import trial as protocol
from ..core.trial import CANDIDATE, SPLIT, fold_config, tag_number
from ..results.folders import RAY_DIR
from .stop_signal import fit_until_stopped

if TYPE_CHECKING:          # types only: the plan is built by the commands, the factory only reads it
    from .plan import FoldTrials, Plan, RunOptions, SearchTrials
    from .ray_session import RayOptions

METRIC, MODE = "val_acc", "max"


def make_tuner(plan: "Plan", trainable, time_budget_s: float | None):
    """A fresh Tuner for the plan's trials (its param_space and TuneConfig), run_config's settings."""
    from ray import tune

    if plan.kind == "search":
        param_space, tune_config, callbacks = search_setup(plan, plan.trials)
    else:
        param_space, tune_config, callbacks = *fold_setup(plan.trials), []
    if plan.inject:
        param_space["_inject"] = plan.inject
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(reuse_actors=True, time_budget_s=time_budget_s,
                                    trial_dirname_creator=trial_dirname, **tune_config),
        run_config=run_config(plan.exp, plan.opts, callbacks))


def trial_dirname(trial) -> str:
    """Short trial folders, `trial_<n>_<id>`, n counting from 1 in the order Tune created them."""
    return protocol.trial_dirname(tag_number(trial.experiment_tag), trial.trial_id)


def search_setup(plan: "Plan", trials: "SearchTrials") -> tuple[dict[str, Any], dict[str, Any], list]:
    """param_space (the constants; Tune's own sampler's space for random search), the TuneConfig's
    searcher, ASHA and sample count, and the searcher's callbacks."""
    import optuna
    import ray

    from ..core.spaces import asha_rounds
    from .searchers import make_scheduler, make_search_alg, search_callbacks, tune_space

    spec, exp = trials.spec, plan.exp
    max_t, grace = asha_rounds(spec.budget, spec.base.evals_per_epoch)
    storage = optuna.storages.RDBStorage(f"sqlite:///{(exp / 'optuna.db').resolve()}")
    # no more trials pending or running than one per CPU of the cluster, plus one ready to start
    max_live = int(ray.cluster_resources().get("CPU", 1)) + 1
    search_alg = make_search_alg(spec.budget.searcher, spec.optuna_space(), [spec.default_point()], METRIC, MODE,
                                 trials.seed, storage, exp.name, max_t, feedback=trials.feedback,
                                 max_live=max_live)
    constants = spec.base.to_dict()
    for k in spec.space:
        constants.pop(k, None)
    if spec.budget.searcher == "random":
        constants.update(tune_space(spec.optuna_space()))     # Tune's own sampler draws from the param_space
    tune_config = dict(metric=METRIC, mode=MODE, search_alg=search_alg, num_samples=spec.budget.num_samples,
                       scheduler=make_scheduler(max_t, grace, spec.budget.reduction_factor, spec.budget.brackets))
    return constants, tune_config, search_callbacks(search_alg)


def fold_setup(trials: "FoldTrials") -> tuple[dict[str, Any], dict[str, Any]]:
    """(param_space, TuneConfig settings) of a cross-validation: without racing a grid over every
    (candidate, split) pair; with a race rule the racing searcher (racing.py), which hands the pairs
    out split by split."""
    from ray import tune

    from .trials import max_rounds
    space: dict[str, Any] = {**trials.base.to_dict(), **fold_config(trials.candidates, trials.k, trials.repeats)}
    splits = trials.k * trials.repeats
    if trials.rule is not None:
        from .racing import race_settings
        rounds = [max_rounds({**space, CANDIDATE: i}) for i in range(len(trials.candidates))]
        return space, race_settings(rounds, splits, trials.rule)
    space.update({CANDIDATE: tune.grid_search(list(range(len(trials.candidates)))),
                  SPLIT: tune.grid_search(list(range(splits)))})
    return space, {}


def run_config(exp: Path, opts: "RunOptions", callbacks: list | tuple = ()):
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


def tune_path(exp: Path, opts: "RayOptions") -> str:
    """Where Ray Tune keeps this experiment: --storage (a shared folder or a URI such as s3://...)
    when every node must reach it, else the experiment folder itself."""
    if not opts.storage:
        return str(exp.resolve())
    # a stage inside an experiment (search --cv-top's cv/) is kept apart from every other one's
    name = f"{exp.parent.name}/{exp.name}" if (exp.parent / "plan.json").exists() else exp.name
    if "://" in opts.storage:
        return f"{opts.storage.rstrip('/')}/{name}"
    return str(Path(opts.storage).resolve() / name)


def run_tuner(fresh, exp: Path, opts: "RunOptions", trainable, callbacks: list | tuple = ()):
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
        tuner = fresh()
    add_output(tuner, callbacks, opts.verbose)
    return fit_until_stopped(tuner)     # SIGTERM / Ctrl-C: Tune saves its state, no results


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


def can_restore(exp: Path, opts: "RayOptions") -> bool:
    """Does `exp` hold Ray Tune state that Tuner.restore can continue?"""
    from ray import tune
    return tune.Tuner.can_restore(f"{tune_path(exp, opts)}/{RAY_DIR}")
