"""Mend, before `--resume`, a trial checkpoint that Ray's saved state names but that no longer exists.

Why it can happen: a trial keeps one checkpoint (`CheckpointConfig(num_to_keep=1)`). When round k+1's
checkpoint arrives, the driver deletes round k's at once, but the experiment state that names the
latest checkpoint of each trial reaches the experiment folder a moment later (Tune writes it and
copies it in a background thread). A driver killed in between (kill -9, a lost node) leaves a state
that names round k's deleted folder, and Tune's restore of that trial then fails on every retry
("Could not recover from checkpoint as it does not exist on storage anymore").

The mend: copy the checkpoint that replaced it (Tune numbers a trial's checkpoints in order, so it is
the next one: round k+1, which the trial reached before the kill) to the named place, with a note of
the round Ray knows of. The trial tells Ray the rounds it holds beyond that (trainable.py) and goes on;
its reports carry their own round as `training_iteration`, so Ray's count stays right although it
was restored one round behind. A newer folder still is not taken: it can hold a round the dead driver
never recorded, and going on from it would leave that round out of the history.

Reads the experiment through ExperimentAnalysis, which starts no Ray; works on any storage Tune can
write to (a folder, or a URI such as s3://...).
"""
from __future__ import annotations

import json
import logging
import sys
from contextlib import contextmanager

import pyarrow.fs
import torch

from ..core.trial import MENDED_FILE, STATE_FILE

CHECKPOINT_PREFIX = "checkpoint_"          # Tune's name for a trial's checkpoint folders


def mend_missing_checkpoints(tune_dir: str) -> list[str]:
    """For each trial of the Tune experiment at `tune_dir` whose named checkpoint is gone, copy the one
    that replaced it there. Returns one line per mended trial (also printed to stderr)."""
    from ray.tune import ExperimentAnalysis

    with _quiet("ray.tune.analysis.experiment_analysis"):     # its warnings about trials with no results yet
        trials = ExperimentAnalysis(tune_dir).trials
    mended = []
    for trial in trials:
        named = trial.checkpoint
        if named is None or _is_file(named.filesystem, f"{named.path}/{STATE_FILE}"):
            continue
        fs, (trial_dir, name) = named.filesystem, named.path.rsplit("/", 1)
        ray_round = named_round(trial)
        source_name = f"{CHECKPOINT_PREFIX}{int(name[len(CHECKPOINT_PREFIX):]) + 1:06d}"
        source = f"{trial_dir}/{source_name}"
        if not _loads(fs, f"{source}/{STATE_FILE}"):
            print(f"--resume: trial {trial.trial_id}'s saved checkpoint {name} is gone and no complete newer one "
                  "took its place; Ray cannot continue that trial and will record it as an error", file=sys.stderr)
            continue
        if fs.get_file_info(named.path).type != pyarrow.fs.FileType.NotFound:
            fs.delete_dir(named.path)
        fs.create_dir(named.path)
        # no threads: Ray's own uploads turn them off for S3 (apache/arrow#32372)
        pyarrow.fs.copy_files(source, named.path, source_filesystem=fs, destination_filesystem=fs, use_threads=False)
        with fs.open_output_stream(f"{named.path}/{MENDED_FILE}") as f:
            f.write(json.dumps({"ray_round": ray_round, "copied_from": source_name}).encode())
        line = (f"--resume: trial {trial.trial_id}'s saved state named a checkpoint replaced when the driver "
                f"stopped ({name}, round {ray_round}); it goes on from the newer {source_name}")
        print(line, file=sys.stderr)
        mended.append(line)
    return mended


def named_round(trial) -> int:
    """The round of the checkpoint a trial's saved state names (0: none), which Ray restores its count
    of rounds from. Tune has no public accessor for it: this is the one place that reads its internals."""
    named = trial.run_metadata.checkpoint_manager.latest_checkpoint_result
    return named.metrics["training_iteration"] if named else 0


def _loads(fs: pyarrow.fs.FileSystem, path: str) -> bool:
    """Whether a checkpoint's state file is there and whole (one cut short by a kill does not load)."""
    try:
        with fs.open_input_file(path) as f:
            torch.load(f, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - missing, truncated or unreadable: not a checkpoint to go on from
        return False
    return True


def _is_file(fs: pyarrow.fs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pyarrow.fs.FileType.File


@contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
