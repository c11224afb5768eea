"""TensorBoard and MLflow records of a search or kfold, both through Ray Tune's own logger callbacks.

TensorBoard (on by default): Ray's TBXLoggerCallback writes an event file into every trial folder
(results/EXP/tune/trial_<n>_<id>/), so `tensorboard --logdir results/EXP` shows every trial. It is
used as it is except for two choices: the scalars are the training curves only (Ray would log every
number of a result: pid, timestamps, time_since_restore, ...), and the HParams of a kfold trial are
its configuration's values and its fold (Ray takes `trial.evaluated_params`, which for kfold's grid
are only the indexes `_candidate` / `_fold_index`). Ray writes the HParams when a trial ends; a trial
cut by the time budget gets no on_trial_complete from Tune, so `on_experiment_end` ends those too.

MLflow (--mlflow [URI]): one parent run per command (named after EXP, in an MLflow experiment named
after EXP), holding the constants of the run as params and, at the end, best.json, report.md and
best_model.pt (kfold: kfold_summary.json, kfold.csv) as artifacts; each trial is a child run
through Ray's MLflowLoggerCallback, nested by the `mlflow.parentRunId` tag it sets on every run it
creates. Its params are the trial's searched hyper-parameters (Ray would log every constant of
trial.config, and for kfold the index of a configuration instead of its values), its metrics the
curves per round (step = round), its `status` tag what the live view calls it.
The default store is SQLite under results/EXP/mlruns/: MLflow 3 refuses a plain `file:` store unless
MLFLOW_ALLOW_FILE_STORE=true ("maintenance mode"); `mlflow ui --backend-store-uri
sqlite:///results/EXP/mlruns/mlflow.db` opens it offline (the ui needs the full `mlflow` package).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.experiment import Trial
from ray.tune.logger import TBXLoggerCallback

from ..core.config import UserError
from ..core.trial import fold_of
from .live_view import hyper_parameters, number_of, trial_status

CURVES = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s", "epoch")
STEP_KEYS = ("training_iteration", "timesteps_total")      # what Ray's loggers take the step from
ARTIFACTS = ("best.json", "report.md", "best_model.pt", "trials.csv", "kfold_summary.json", "kfold.csv")
PARENT_TAG = "tune_cifar.parent"


def trial_params(trial: Trial, keys: list[str]) -> dict[str, Any]:
    """What a trial tried: the searched keys (kfold: its configuration's values, and which fold)."""
    params = hyper_parameters(trial, keys)
    fold = fold_of(trial.config)
    if fold is not None:
        params.update(config=fold.candidate, fold=fold.split)
    return params


def curves(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k in CURVES or k in STEP_KEYS}


class TensorBoardCallback(TBXLoggerCallback):
    """Ray's TensorBoard logger with the curves only and the searched keys as HParams (module doc)."""

    def __init__(self, params: list[str]):
        super().__init__()
        self.params = params

    def log_trial_result(self, iteration: int, trial: Trial, result: dict):
        super().log_trial_result(iteration, trial, curves(result))

    def log_trial_end(self, trial: Trial, failed: bool = False):
        # Ray reads the HParams from trial.evaluated_params: lend it this trial's values for the call
        # (str(None): TensorBoard's HParams take no None)
        saved = trial.evaluated_params
        trial.evaluated_params = {k: ("None" if v is None else v) for k, v in trial_params(trial, self.params).items()}
        try:
            super().log_trial_end(trial, failed)
        finally:
            trial.evaluated_params = saved

    def on_experiment_end(self, trials: list[Trial], **info):
        for trial in list(self._trial_writer):
            self.log_trial_end(trial, failed=trial.status == Trial.ERROR)


def check_mlflow() -> None:
    """--mlflow without the package: one line, before anything is written or started."""
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise UserError("--mlflow needs MLflow: pip install 'tune_cifar[mlflow]' (or mlflow)") from None


def tracking_uri(uri: str, exp: Path) -> str:
    """--mlflow URI as given; --mlflow alone: the SQLite store under results/EXP/mlruns/."""
    if uri:
        return uri
    (exp / "mlruns").mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(exp / 'mlruns' / 'mlflow.db').resolve()}"


class MLflowRuns:
    """The parent run of a command and the callback for its trials' child runs (module doc)."""

    def __init__(self, uri: str, exp: Path, kind: str, constants: dict[str, Any], resume: bool):
        from mlflow.tracking import MlflowClient

        self.uri, self.exp = tracking_uri(uri, exp), exp
        self.client = MlflowClient(self.uri)
        found = self.client.get_experiment_by_name(exp.name)
        if found is not None:
            experiment_id = found.experiment_id
        else:   # a local store keeps its artifacts beside it; a server decides for itself
            where = (exp / "mlruns" / "artifacts").resolve().as_uri() if not uri else None
            experiment_id = self.client.create_experiment(exp.name, artifact_location=where)
        parent = None
        if resume:   # --resume carries on under the parent run of the interrupted command
            runs = self.client.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '1'",
                                           order_by=["attributes.start_time DESC"], max_results=1)
            parent = runs[0] if runs else None
        if parent is None:
            parent = self.client.create_run(experiment_id, run_name=exp.name, tags={PARENT_TAG: "1", "kind": kind})
            for key, value in constants.items():
                self.client.log_param(parent.info.run_id, key, value)
        else:
            self.client.update_run(parent.info.run_id, status="RUNNING")
        self.parent_id = parent.info.run_id

    def callback(self, params: list[str]) -> "TrialRuns":
        return TrialRuns(self.uri, self.exp.name, self.parent_id, params)

    def finish(self, summary: dict[str, Any] | None, status: str = "FINISHED") -> None:
        """The parent's numbers and files once the summary is written; its end status."""
        if summary:
            for key in ("val_acc", "test_acc", "test_loss", "wall_s"):
                if isinstance(summary.get(key), (int, float)):
                    self.client.log_metric(self.parent_id, key, float(summary[key]))
        for name in ARTIFACTS if summary else ():
            if (self.exp / name).is_file():
                self.client.log_artifact(self.parent_id, str(self.exp / name))
        self.client.set_terminated(self.parent_id, status=status)


class TrialRuns(MLflowLoggerCallback):
    """Ray's MLflow logger: one child run per trial under the parent (the tag it puts on every run)."""

    def __init__(self, uri: str, experiment: str, parent_id: str, params: list[str]):
        super().__init__(tracking_uri=uri, experiment_name=experiment, tags={"mlflow.parentRunId": parent_id},
                         log_params_on_trial_end=True)    # no trial.config params: see log_trial_start
        self.params = params
        self._clock_out = False

    def log_trial_start(self, trial: Trial):
        new = trial not in getattr(self, "_trial_runs", {})
        super().log_trial_start(trial)
        if new:
            run_id = self._trial_runs[trial]
            self.mlflow_util._get_client().set_tag(run_id, "mlflow.runName", f"trial_{number_of(trial)}")
            self.mlflow_util.log_params(run_id=run_id, params_to_log=trial_params(trial, self.params))

    def log_trial_result(self, iteration: int, trial: Trial, result: dict):
        super().log_trial_result(iteration, trial, curves(result))

    def log_trial_end(self, trial: Trial, failed: bool = False):
        if trial not in self._trial_runs:
            return
        run_id = self._trial_runs.pop(trial)
        client = self.mlflow_util._get_client()
        client.set_tag(run_id, "status", trial_status(trial, ended_by_clock=self._clock_out, ending=True))
        client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")

    def on_experiment_end(self, trials: list[Trial], **info):
        self._clock_out = True    # trials still open were cut by the time budget (no on_trial_complete)
        for trial in list(self._trial_runs):
            self.log_trial_end(trial, failed=trial.status == Trial.ERROR)


def constants_of(plan) -> dict[str, Any]:
    """The parent run's params: the base training config every trial starts from, and the kind."""
    base = plan.trials.base if hasattr(plan.trials, "base") else plan.trials.spec.base
    return {"kind": plan.kind, **base.to_dict()}

