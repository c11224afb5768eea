"""The seam to Ray's (and MLflow's, and Optuna's) private parts, pinned: each private name the code
relies on still exists in the installed release. A Ray release that renames one fails here by name,
in seconds, instead of as a wrong study or a --resume that cannot restore. Starts no Ray.

Where each one is used:
  OptunaSearch._ot_trials / _completed_trials / _ot_study   tuning/searchers.py (the truthful study)
  optuna FrozenTrial._trial_id                               tuning/searchers.py (random search's book)
  Tuner._local_tuner, TunerInternal.get_run_config           tuning/tuners.py add_output
  Trial.run_metadata.checkpoint_manager.latest_checkpoint_result   tuning/checkpoint_mend.py
  TBXLoggerCallback._trial_writer                            tuning/loggers.py
  MLflowLoggerCallback.mlflow_util._get_client               tuning/loggers.py
  ray._private...is_token_auth_enabled, ray._raylet.AuthenticationTokenLoader   tuning/ray_session.py
"""
from __future__ import annotations

import re
from pathlib import Path

import optuna
import ray


def test_ray_is_the_tested_minor_and_pyproject_pins_it():
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    pin = re.search(r'"ray\[[^\]]*\]~=(\d+)\.(\d+)\.\d+"', pyproject)
    assert pin, "pyproject.toml pins ray with ~=MAJOR.MINOR.PATCH"
    assert tuple(int(x) for x in ray.__version__.split(".")[:2]) == (int(pin[1]), int(pin[2]))


def test_optuna_search_keeps_its_book_of_trials():
    from ray.tune.search.optuna import OptunaSearch
    search = OptunaSearch(space={"x": optuna.distributions.FloatDistribution(0, 1)}, metric="m", mode="max")
    assert isinstance(search._ot_trials, dict) and isinstance(search._completed_trials, set)
    assert isinstance(search._ot_study, optuna.Study)
    for method in ("on_trial_result", "on_trial_complete", "save", "restore", "suggest"):
        assert callable(getattr(search, method))


def test_optuna_frozen_trials_carry_their_storage_id():
    study = optuna.create_study()
    study.ask()
    assert isinstance(study.get_trials(deepcopy=False)[0]._trial_id, int)


def test_a_tuner_exposes_its_run_config():
    from ray import tune
    from ray.tune.impl.tuner_internal import TunerInternal
    assert "_local_tuner" in tune.Tuner.__annotations__
    assert callable(TunerInternal.get_run_config)


def test_a_trials_checkpoint_manager_names_its_latest_checkpoint():
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.tune.experiment.trial import Trial
    import inspect
    assert "self.run_metadata = _TrainingRunMetadata()" in inspect.getsource(Trial.__init__)
    assert "checkpoint_manager" in inspect.getsource(Trial)
    assert hasattr(_CheckpointManager, "latest_checkpoint_result")


def test_the_loggers_private_handles():
    from ray.air._internal.mlflow import _MLflowLoggerUtil
    from ray.tune.logger import TBXLoggerCallback
    assert isinstance(TBXLoggerCallback()._trial_writer, dict)
    assert callable(_MLflowLoggerUtil._get_client)
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    assert "mlflow_util" in MLflowLoggerCallback.__init__.__code__.co_names


def test_token_authentication_helpers():
    from ray._private.authentication.authentication_utils import is_token_auth_enabled
    from ray._raylet import AuthenticationTokenLoader
    assert callable(is_token_auth_enabled)
    loader = AuthenticationTokenLoader.instance()
    assert callable(loader.has_token) and callable(loader.get_raw_token)
