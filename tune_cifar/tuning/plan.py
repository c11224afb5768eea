"""The typed plan of an experiment: what a command checked and decided before anything is written or
started, and what plan.json records of it (the single source of truth on --resume).

A Plan says which experiment (folder, options, resources, time budget) and which trials:
`SearchTrials` (a searcher proposes configurations of a space, ASHA judges them) or `FoldTrials`
(every candidate configuration on every split of repeated K-fold). tuners.make_tuner turns either
into a Ray Tune Tuner, runner.run carries the plan out. Nothing here imports Ray.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..core.config import TrainConfig, UserError
from ..core.spaces import SearchSpec
from ..results.folders import read_json
from .ray_session import RayOptions

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
class SearchTrials:
    """A search's trials: the searcher (spec.budget.searcher) proposes points of spec's space, ASHA
    stops the weak ones at its rungs."""
    spec: SearchSpec
    seed: int = 0
    feedback: str = "pruned"           # what Optuna is told of a stopped trial (searchers.py)
    kind = "search"

    def searched(self) -> list[str]:
        return list(self.spec.space)

    def record(self) -> dict[str, Any]:
        return {"kind": self.kind, "spec": self.spec.to_dict()}


@dataclass
class FoldTrials:
    """A cross-validation's trials: each candidate (hyper-parameters over `base`) on each of the
    J = k x repeats splits, a grid; every trial runs its candidate's whole budget."""
    spec: SearchSpec
    base: TrainConfig
    candidates: list[dict[str, Any]]
    k: int
    repeats: int = 1
    race: dict[str, Any] | None = None         # the race settings as plan.json records them; None / off: every split
    kind = "kfold"

    @property
    def rule(self):
        """The racing rule (core.racing.RaceRule) of the race settings; None without racing."""
        if not self.race or not self.race["on"]:
            return None
        from ..core.racing import RaceRule
        from ..core.stats import holdout_ratio
        return RaceRule(min_splits=int(self.race["min_splits"]), alpha=float(self.race["alpha"]),
                        ratio=holdout_ratio(self.k))

    def searched(self) -> list[str]:
        return sorted({key for c in self.candidates for key in c})

    def record(self) -> dict[str, Any]:
        return {"kind": self.kind, "spec": self.spec.to_dict(), "base": self.base.to_dict(),
                "candidates": self.candidates, "k": self.k, "repeats": self.repeats, "race": self.race}


@dataclass
class Plan:
    """Everything `runner.run` needs; built and checked by the commands before anything is written."""
    exp: Path
    opts: RunOptions
    trials: SearchTrials | FoldTrials
    resources: dict[str, Any]
    time_budget: float | None
    phase: str                                  # what the Tuner's time is called in the phases
    write_results: Callable[[Any, Phases, dict[str, Any]], dict[str, Any]]   # (ResultGrid, ...) -> summary
    summary_file: str                           # best.json / kfold_summary.json
    inject: dict[str, Any] = field(default_factory=dict)     # fault injection (trainable.fault_injection)
    fitting: dict[str, Any] | None = None       # what core/fitting.py changed to fit a small data set

    @property
    def kind(self) -> str:
        return self.trials.kind

    def record(self) -> dict[str, Any]:
        """plan.json."""
        return {**self.trials.record(), "options": recorded_options(self.opts), "resources": self.resources,
                "inject": self.inject, **({"fitting": self.fitting} if self.fitting else {})}

    def spec_record(self) -> dict[str, Any]:
        """spec.yaml (the command is added by the runner)."""
        t = self.trials
        if isinstance(t, SearchTrials):
            return t.spec.to_dict()
        return {"kind": t.kind, "k": t.k, "repeats": t.repeats, **t.spec.to_dict(), "base": t.base.to_dict(),
                "candidates": t.candidates, "race": t.race}


# The rules of the command-line numbers the commands check, in one form (as TrainConfig's RULES):
# (accepts the value?, what to say). A flag left out (None) is not checked.
FLAG_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "subset": ((lambda v: v >= 1), "must be positive"),
    "max_failures": ((lambda v: v >= 0), "must be >= 0 (Ray would retry forever)"),
    "num_samples": ((lambda v: v >= 1), "must be at least 1"),
    "top": ((lambda v: v >= 1), "must be at least 1"),
    "epochs": ((lambda v: v >= 1), "must be at least 1"),
    "cv_top": ((lambda v: v >= 1), "must be at least 1"),
    "repeats": ((lambda v: v >= 1), "must be at least 1"),
}


def check_flags(opts: Any, keys: tuple[str, ...]) -> None:
    """Each of `keys` of `opts` against its FLAG_RULES entry: a one-line UserError naming the flag."""
    for key in keys:
        value = getattr(opts, key)
        ok, why = FLAG_RULES[key]
        if value is not None and not ok(value):
            raise UserError(f"--{key.replace('_', '-')}={value} {why}")


def recorded_options(opts: RunOptions) -> dict[str, Any]:
    """The options as plan.json records them (what a --resume re-imposes)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()
            if k not in ("ray", "started", "command", "resume", "overwrite")}


def reopen(name: str | None, opts: RunOptions, default_name: str, plan_flags: tuple[str, ...]):
    """An interrupted experiment's saved plan: (folder, plan.json, its spec, the options with the
    plan's flags re-imposed). `name`, the space the command names (if any), must be the one it was
    planned from, and flags given again must agree with the plan."""
    from ..results.folders import experiment_dir
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


def check_race_flags(opts, k: int, repeats: int) -> None:
    """--race-alpha in (0, 0.5], --race-min-splits in [2, J]: else a UserError naming the flag."""
    from ..core.racing import check_race
    problems = check_race(opts.race_min_splits, opts.race_alpha, k * repeats)
    if problems:
        raise UserError(problems[0])


def time_reserve(time_budget: float) -> float:
    """Seconds of a --time-budget kept back from the trials for the test, the report and shut-down."""
    return TIME_RESERVE[0] + TIME_RESERVE[1] * time_budget


def check_time_budget(time_budget: float | None, where: str = "--time-budget") -> None:
    if time_budget is not None and not time_budget > time_reserve(time_budget):
        raise UserError(f"{where}={time_budget:g}: must be more than the {time_reserve(time_budget):.0f}s kept "
                        "for the test, the report and shut-down")
