"""The experiment folder: its layout, atomic writes that never clobber a result, and reading it back.

Imports no Ray: report, export, compare and kfold --from-search read folders through this module.

    results/<name>/
      spec.yaml      the resolved search space / config and the command that made it
      trials.csv     one row per trial            history.csv   one row per trial x epoch
      best.json      best config, val and test accuracy       best_model.pt
      optuna.db      the Optuna study (SQLite)    tune/         Ray Tune's own state (--resume)
      kfold.csv, kfold_folds.csv (kfold)          metrics.json, model.pt (train)
      report.md, *.png (report)

Every file is written to a temporary name in the same folder and renamed into place, so a reader
(or a crash) never sees half a file.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from ..core.config import UserError
from ..core.trial import SUCCEEDED
from . import lock

RAY_DIR = "tune"


def command_line(args: list[str] | None = None) -> str:
    """The command that made an experiment, as a user would type it again (`args`: the arguments
    of a command run in-process, e.g. by bench or compare; default: this process's own)."""
    return "python -m tune_cifar " + shlex.join(map(str, sys.argv[1:] if args is None else args))


def _umask() -> int:
    mask = os.umask(0o022)      # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def _atomic(path: Path, write) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; a result file gets the mode any file would (0644 under umask 022),
        # so a teammate or another node's user can read results/
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: Path, text: str) -> Path:
    return _atomic(Path(path), lambda f: f.write(text.encode()))


def write_json(path: Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def write_yaml(path: Path, obj: Any) -> Path:
    return write_text(path, yaml.safe_dump(obj, sort_keys=False))


def write_csv(path: Path, frame) -> Path:
    return write_text(path, frame.to_csv(index=False))


def write_torch(path: Path, obj: Any) -> Path:
    import torch
    return _atomic(Path(path), lambda f: torch.save(obj, f))


def write_png(path: Path, fig) -> Path:
    return _atomic(Path(path), lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def read_yaml(path: Path) -> Any:
    return yaml.safe_load(Path(path).read_text())


def _jsonable(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def check_writable(results_dir: Path) -> None:
    """Fail before any training when the results folder cannot be created or written."""
    d = Path(results_dir)
    probe_dir = d
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise UserError(f"results folder {d}: {probe_dir} is not a folder")
    if not os.access(probe_dir, os.W_OK | os.X_OK):
        raise UserError(f"results folder {d} is not writable ({probe_dir} denies writing)")


def experiment_dir(results_dir: Path, name: str, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Decide (without touching anything) the folder of an experiment, refusing to clobber one."""
    if not name or "/" in name or name in (".", ".."):
        raise UserError(f"--name {name!r} must be a plain folder name")
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    check_writable(results_dir)
    exp = Path(results_dir) / name
    if resume and exp.exists():
        lock.acquire(exp)            # before anything of it is read: held until the command ends
    else:
        lock.check_unlocked(exp)     # a running experiment is named as such; the lock: start_experiment
    if exp.exists() and not (resume or overwrite):
        raise _exists(exp)
    if resume and not exp.exists():
        raise UserError(f"--resume: no experiment folder {exp} to continue")
    return exp


def _exists(exp: Path) -> UserError:
    return UserError(f"experiment folder {exp} already exists: pass --resume to continue it "
                     "or --overwrite to replace it (or choose another --name)")


def start_experiment(exp: Path, overwrite: bool, storage: str | None = None, resume: bool = False) -> Path:
    """Create the folder once every check has passed (replacing it only under --overwrite, together
    with Ray Tune's state of the same experiment in a separate local --storage folder), under the
    experiment's lock (results/lock.py), taken first and held until the command ends."""
    lock.acquire(exp)                # a no-op where held already (--resume, a stage such as cv/)
    if storage and "://" not in storage:
        # Tune's state in a local --storage folder is named after the experiment only, so another
        # results folder's experiment of the same name would share it: locked as well (the same
        # path as exp without --storage: covered, nothing more taken)
        lock.acquire(Path(storage))
    if exp.exists() and not (overwrite or resume):
        raise _exists(exp)           # made by another command since experiment_dir looked
    if overwrite:
        if exp.exists():
            shutil.rmtree(exp)
        if storage and "://" not in storage and (Path(storage) / RAY_DIR).exists():
            shutil.rmtree(Path(storage) / RAY_DIR)
    exp.mkdir(parents=True, exist_ok=True)
    return exp


def experiment_path(results_dir: Path, name: str) -> Path:
    """An existing experiment: NAME in the results folder, or a path to the folder itself."""
    p = Path(name) if Path(name).is_dir() and (Path(name) / "spec.yaml").exists() else Path(results_dir) / name
    if not p.is_dir():
        raise UserError(f"no experiment folder {p}")
    return p


def ranked_trials(trials):
    """The rows of trials.csv that finished with a validation accuracy, best first; of equals, the one
    trained longer (what best.json, --from-search and the report call the best)."""
    ok = trials[trials["status"].isin([s.value for s in SUCCEEDED])].dropna(subset=["last_val_acc"])
    return ok.sort_values(["last_val_acc", "rounds"], ascending=False)


def find_experiment(results_dir: Path, model: str, mode: str) -> Path | None:
    """The newest finished search experiment of model x mode in results_dir."""
    found = []
    for spec_file in Path(results_dir).glob("*/spec.yaml"):
        exp = spec_file.parent
        if not (exp / "best.json").exists() or (exp / "kfold.csv").exists():
            continue
        base = (read_yaml(spec_file) or {}).get("base", {})
        if base.get("model") == model and base.get("mode") == mode:
            found.append((spec_file.stat().st_mtime, exp))
    return max(found)[1] if found else None
