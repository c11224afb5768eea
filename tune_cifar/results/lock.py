"""One driver per experiment: an exclusive lock held for a writing command's whole life.

Every command that writes an experiment (search, kfold, search --cv-top with its cv/ stage, train,
compare --k; fresh, --resume or --overwrite) takes the lock of the experiment's folder before it
reads or changes anything there, and keeps it until the command ends. A second writer is refused
with one line (exit 2) naming the process, host and start time of the holder. Readers (report,
export, dashboard) never take it: they must work while a search runs.

The lock is `fcntl.flock` on a small file, so the kernel drops it when the holding process dies,
however it dies: a kill -9 leaves a file with stale contents but no lock, and the next command takes
it. The file holds the holder's pid, host, command and start time, only so that a refusal can say who
holds it; whether the experiment is locked is always asked of the kernel, never read from the file.

Where the file lives: beside the experiment, `R/.EXP.lock`, not inside `R/EXP/`. A lock file must
never be deleted or replaced while anyone may hold it (a process holding the old inode and one
locking a new file at the same path would both "hold" the lock), and `--overwrite` deletes the
experiment folder, as may a user's `rm -r`. A sibling survives both; it also exists before a fresh
experiment's folder is created, so creating the folder happens under the lock. The file is never
removed (removing it on release would race with the next locker for the same reason); it is a few
bytes of dot-file per experiment.

A stage inside an experiment (search --cv-top's cv/) is covered by the lock of the experiment
around it, which the same process holds: taking it again is a no-op, never a self-deadlock. flock
locks belong to an open file description, so the lock is kept per process in one table here, and a
command run again in the same process (tests, bench, compare --run-missing) takes it again
reentrantly; `command_scope` releases what a command took when it ends.

Not covered: an experiment on a file system without flock between its clients (some NFS setups),
and Ray Tune state in a --storage URI (s3://...), which has no lock; a local --storage folder is
named after the experiment, which the lock covers.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from ..core.config import UserError

RETRY_S = 1.0        # a brief lock someone else takes to look (is_locked) must not read as "in use"


class ExperimentLocked(UserError):
    """Another process holds the experiment's lock (a UserError: one line, exit 2)."""


_held: dict[Path, list] = {}          # resolved experiment folder -> [fd, times taken]
_scopes: list[tuple[str | None, list[Path]]] = []     # per running command: (its command line, locks taken)


def lock_file(exp: Path) -> Path:
    """The lock file of experiment folder `exp`: `.EXP.lock` beside it (see the module's docstring)."""
    exp = _key(exp)
    return exp.parent / f".{exp.name}.lock"


def _key(exp: Path) -> Path:
    return Path(os.path.abspath(exp))       # not resolve(): the folder may not exist yet


def _covering(exp: Path) -> Path | None:
    """The folder whose lock this process holds and that is `exp` or a folder above it."""
    key = _key(exp)
    return next((k for k in (key, *key.parents) if k in _held), None)


def holds(exp: Path) -> bool:
    """Whether this process holds the lock of `exp` (or of the experiment `exp` is a stage of)."""
    return _covering(exp) is not None


def acquire(exp: Path, command: str | None = None) -> None:
    """Take the lock of experiment folder `exp` for the rest of the command (see command_scope), or
    raise ExperimentLocked naming its holder. Writes only the lock file, and only once it is ours."""
    covering = _covering(exp)
    if covering is not None:
        _held[covering][1] += 1
        _note_taken(covering)
        return
    path = lock_file(exp)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_CLOEXEC (Python's default) matters: a process started by this one (Ray's raylet) must
        # not inherit the lock and keep it after this driver is killed
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as e:
        raise UserError(f"cannot lock experiment {exp}: {path}: {e.strerror}") from None
    if not _try_flock(fd, fcntl.LOCK_EX):
        holder = _read_holder(fd)
        os.close(fd)
        raise ExperimentLocked(f"experiment {_key(exp)} is in use by {describe(holder)}: wait for it to end "
                               f"(or stop that process); lock file {path}")
    _write_holder(fd, command or (_scopes[-1][0] if _scopes else None))
    _held[_key(exp)] = [fd, 1]
    _note_taken(_key(exp))


def check_unlocked(exp: Path) -> None:
    """Refuse (ExperimentLocked) when another process holds the lock of `exp`; takes nothing and
    writes nothing, so a command can say so before its own checks (and before Ray starts)."""
    if holds(exp):
        return
    path = lock_file(exp)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)   # no file: nobody ever locked it
    except FileNotFoundError:
        return
    except OSError as e:
        raise UserError(f"cannot read the lock of experiment {exp}: {path}: {e.strerror}") from None
    try:
        # a shared lock conflicts only with a holder's exclusive one, never with another look
        if not _try_flock(fd, fcntl.LOCK_SH, retry_s=0.0):
            raise ExperimentLocked(f"experiment {_key(exp)} is in use by {describe(_read_holder(fd))}: wait for "
                                   f"it to end (or stop that process); lock file {path}")
    finally:
        os.close(fd)          # closing drops the shared lock


def release(exp: Path) -> None:
    """Give back one taking of the lock of `exp`; the last one closes the file (the kernel unlocks)."""
    key = _covering(exp)
    if key is None:
        return
    entry = _held[key]
    entry[1] -= 1
    if entry[1] <= 0:
        del _held[key]
        os.close(entry[0])


@contextlib.contextmanager
def command_scope(command: str | None = None) -> Iterator[None]:
    """The life of one command (`command`: its command line, recorded in the locks it takes): the
    locks taken inside are released when it ends (a process that dies releases them anyway).
    Commands run one after another in a process get their own scopes."""
    _scopes.append((command, []))
    try:
        yield
    finally:
        for exp in reversed(_scopes.pop()[1]):
            release(exp)


def _note_taken(key: Path) -> None:
    if _scopes:
        _scopes[-1][1].append(key)


def _try_flock(fd: int, kind: int, retry_s: float = RETRY_S) -> bool:
    deadline = time.monotonic() + retry_s
    while True:
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def _write_holder(fd: int, command: str | None) -> None:
    """Who holds the lock, in the locked file itself: rewritten in place, never by rename (a new
    inode would be a new, unlocked file)."""
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "command": command or "python -m tune_cifar " + " ".join(sys.argv[1:])}
    data = (json.dumps(holder) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 65536, 0).decode() or "{}")
    except (OSError, ValueError):       # caught while the holder writes it
        return {}


def holder(exp: Path) -> dict[str, Any] | None:
    """The recorded holder of the lock of `exp` when the lock is held by some process, else None."""
    path = lock_file(exp)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        if holds(exp) or not _try_flock(fd, fcntl.LOCK_SH, retry_s=0.0):
            return _read_holder(fd)
        return None
    finally:
        os.close(fd)


def describe(holder: dict[str, Any]) -> str:
    """`pid 123 on host h since 2026-...Z (python -m tune_cifar search ...)`."""
    if not holder.get("pid"):
        return "another process (just starting)"
    text = f"pid {holder['pid']} on host {holder.get('host', '?')} since {holder.get('since', '?')}"
    return text + (f" ({holder['command']})" if holder.get("command") else "")
