"""Mend, before `--resume`, a trial checkpoint that Ray's saved state names but that no longer exists.

Why it can happen: a trial keeps one checkpoint (`CheckpointConfig(num_to_keep=1)`). When round k+1's
checkpoint arrives, the driver deletes round k's at once, but the experiment state that names the
latest checkpoint of each trial reaches the experiment folder a moment later (Tune writes it and
copies it in a background thread). A driver killed in between (kill -9, a lost node) leaves a state
that names round k's deleted folder, and Tune's restore of that trial then fails on every retry
("Could not recover from checkpoint as it does not exist on storage anymore").

The mend: copy the newest complete checkpoint of the trial (round k+1) to the named place. The trial
then goes on from round k+1, which it reached before the kill. Its reports carry their own round as
`training_iteration` (trainable.py), so Ray's count of rounds stays right although it was restored
one round behind.

Reads the experiment through ExperimentAnalysis, which starts no Ray; works on any storage Tune can
write to (a folder, or a URI such as s3://...).
"""
from __future__ import annotations

import logging
import sys
from contextlib import contextmanager

import pyarrow.fs
import torch

from .trainable import STATE_FILE

CHECKPOINT_PREFIX = "checkpoint_"          # Tune's name for a trial's checkpoint folders


def mend_missing_checkpoints(tune_dir: str) -> list[str]:
    """For each trial of the Tune experiment at `tune_dir` whose named checkpoint is gone, copy its
    newest complete one there. Returns one line per mended trial (also printed to stderr)."""
    from ray.tune import ExperimentAnalysis

    with _quiet("ray.tune.analysis.experiment_analysis"):     # its warnings about trials with no results yet
        trials = ExperimentAnalysis(tune_dir).trials
    mended = []
    for trial in trials:
        named = trial.checkpoint
        if named is None or _is_file(named.filesystem, f"{named.path}/{STATE_FILE}"):
            continue
        source = _newest_complete(named.filesystem, named.path.rsplit("/", 1)[0])
        if source is None:
            continue
        fs = named.filesystem
        if fs.get_file_info(named.path).type != pyarrow.fs.FileType.NotFound:
            fs.delete_dir(named.path)
        fs.create_dir(named.path)
        pyarrow.fs.copy_files(source, named.path, source_filesystem=fs, destination_filesystem=fs)
        line = (f"--resume: trial {trial.trial_id}'s saved state named a checkpoint replaced when the driver "
                f"stopped ({named.path.rsplit('/', 1)[1]}); it goes on from the newer {source.rsplit('/', 1)[1]}")
        print(line, file=sys.stderr)
        mended.append(line)
    return mended


def _newest_complete(fs: pyarrow.fs.FileSystem, trial_dir: str) -> str | None:
    """The trial's newest checkpoint folder whose state loads (one cut short by the kill does not)."""
    entries = fs.get_file_info(pyarrow.fs.FileSelector(trial_dir, allow_not_found=True))
    folders = sorted((e.path for e in entries if e.type == pyarrow.fs.FileType.Directory
                      and e.base_name.startswith(CHECKPOINT_PREFIX)), reverse=True)
    for folder in folders:
        try:
            with fs.open_input_file(f"{folder}/{STATE_FILE}") as f:
                torch.load(f, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - missing, truncated or unreadable: not a checkpoint to go on from
            continue
        return folder
    return None


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
