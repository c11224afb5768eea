"""The trial protocol: what a trial's status is called, how a trial's number is written into its
folder name and read back, and how a cross-validation trial's configuration says which candidate and
which split it trains. trials.csv, history.csv, the live view, the searcher, the loggers, kfold and
the report all speak it; none spells a status or a private key of its own.

No torch, no Ray: a Ray Trial or a ResultGrid row is read by the tuning band, which hands this module
plain values.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class Status(str, enum.Enum):
    """A trial's status, as trials.csv writes it (the enum's value) and the live view shows it."""
    PENDING = "pending"
    PAUSED = "paused"
    RUNNING = "running"
    COMPLETED = "completed"            # ran every round of its budget
    STOPPED = "stopped"                # stopped from outside: by ASHA, or by the time budget
    EARLY_STOPPED = "early_stopped"    # its own patience rule ended it
    DIVERGED = "diverged"              # NaN / inf loss: the searcher is told val_acc = 0
    OOM = "oom"                        # CUDA out of memory
    ERROR = "error"                    # raised more often than --max-failures allows
    NOT_RUN = "not_run"                # no round before the end (time budget, interruption)

    def __str__(self) -> str:
        return self.value


# the statuses the trainable reports itself when a trial ends by its own rule (trainable / fit)
OWN_ENDINGS = (Status.DIVERGED, Status.OOM, Status.EARLY_STOPPED)
# the statuses that end with a usable validation accuracy (what may be ranked and shortlisted)
SUCCEEDED = (Status.COMPLETED, Status.STOPPED, Status.EARLY_STOPPED)


def status_of(*, reported: str | None, rounds: int, max_rounds: int | None, error: bool = False) -> Status:
    """The one rule that names a trial that has ended (or was interrupted).

    reported: the `status` of its last report (one of OWN_ENDINGS, else "running" / None);
    rounds: rounds it reported; max_rounds: rounds of its whole budget (None: unknown, so a trial
    that ended without its own rule counts as stopped); error: it raised past --max-failures."""
    if error:
        return Status.ERROR
    if reported in {s.value for s in OWN_ENDINGS}:
        return Status(reported)
    if rounds == 0:
        return Status.NOT_RUN
    if max_rounds is not None and rounds >= max_rounds:
        return Status.COMPLETED
    return Status.STOPPED


def label(status: Status, ended_by_clock: bool = False) -> str:
    """What the live view and the MLflow tag show for a status: the trials.csv word, and for a
    trial stopped from outside who stopped it."""
    if status is Status.STOPPED:
        return "stopped (time budget)" if ended_by_clock else "stopped by ASHA"
    return "not run" if status is Status.NOT_RUN else status.value


# What a trial's checkpoint folder holds (tuning/trainable.py writes it, --resume and the test read it).
STATE_FILE = "state.pt"         # fit's state: model, optimizer, history, round
META_FILE = "trial.json"        # when the trial's first attempt started
MENDED_FILE = "mended.json"     # in a checkpoint --resume put in place of a lost one (checkpoint_mend.py)


# --------------------------------------------------------------------------- trial numbers

def trial_dirname(number: int | str, trial_id: str) -> str:
    """A trial's folder: `trial_<n>_<id>`, n counting from 1 in the order Tune created the trials."""
    return f"trial_{number}_{trial_id}"


def trial_number(trial_dir: str | Path | None) -> int | None:
    """n of a `trial_<n>_<id>` folder (a path or a name); None for a folder not named that way."""
    parts = Path(trial_dir or "").name.split("_")
    return int(parts[1]) if len(parts) >= 2 and parts[0] == "trial" and parts[1].isdigit() else None


def tag_number(experiment_tag: str) -> int:
    """n of Tune's experiment tag `<n>_<params>` (0 when it has none), the n of trial_dirname."""
    head = experiment_tag.split("_", 1)[0]
    return int(head) if head.isdigit() else 0


# --------------------------------------------------------------------------- cross-validation trials

# The keys a cross-validation trial's Tune config carries besides the TrainConfig fields.
CANDIDATES, CANDIDATE, SPLIT, K, REPEATS = "_candidates", "_candidate", "_fold_index", "_k", "_repeats"
FOLD_KEYS = (CANDIDATES, CANDIDATE, SPLIT, K, REPEATS)


@dataclass(frozen=True)
class FoldRef:
    """Which candidate a cross-validation trial trains, on which of the J = k x repeats splits."""
    candidate: int
    split: int
    k: int
    repeats: int = 1

    @property
    def repeat(self) -> int:
        return self.split // self.k


def fold_config(candidates: list[dict[str, Any]], k: int, repeats: int) -> dict[str, Any]:
    """The private keys every trial of a cross-validation shares (candidate and split are added per trial)."""
    return {CANDIDATES: candidates, K: k, REPEATS: repeats}


def fold_of(config: dict[str, Any]) -> FoldRef | None:
    """The candidate and split of a cross-validation trial's config; None for a search trial."""
    if SPLIT not in config:
        return None
    return FoldRef(int(config[CANDIDATE]), int(config[SPLIT]), int(config[K]), int(config.get(REPEATS, 1)))


def candidate_values(config: dict[str, Any]) -> dict[str, Any]:
    """The config with a cross-validation trial's candidate hyper-parameters applied (a search
    trial's config as it is)."""
    if CANDIDATE not in config:
        return dict(config)
    return {**config, **config[CANDIDATES][int(config[CANDIDATE])]}


def without_fold_keys(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in FOLD_KEYS}
