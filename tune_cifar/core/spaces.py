"""Search-space files -> a validated SearchSpec. The one place a search-space file is checked.

The shipped spaces live inside the package (tune_cifar/search_spaces/*.yaml, read through
importlib.resources, so they are found after any kind of install and from any folder); a
`search_spaces/` folder in the working directory, or a path to a .yaml file, may add one's own.

    model: simple_cnn            # simple_cnn | alexnet | vgg16 | resnet18
    mode: scratch                # scratch | frozen | full
    resolution: 32               # optional; default per model x mode
    budget: {max_epochs: 8, grace_period: 1, reduction_factor: 3, num_samples: 16, time_budget_s: 900,
             searcher: tpe, brackets: 1}       # searcher: tpe | random; brackets: ASHA's HyperBand brackets
    resources: {gpu: 0.25, cpu: 1}      # per trial; gpu is used only where GPUs exist
    fixed: {schedule: onecycle, label_smoothing: 0.1, augment: crop_flip}   # any TrainConfig field
    space:                        # searched hyper-parameters: loguniform | uniform | int | choice
      lr: {loguniform: [1.0e-3, 0.3]}
      optimizer: {choice: [sgd, adam, adamw]}
      batch_size: {choice: [128, 256, 512]}
    default: {lr: 0.05, optimizer: sgd, batch_size: 256}   # optional known-good point, tried first

Every error names the file and the key: `search_spaces/x.yaml: space.lr.loguniform: low must be > 0`.
"""
from __future__ import annotations

import importlib.resources
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import TrainConfig, UserError

SPACES_DIRS = (Path("search_spaces"), Path(str(importlib.resources.files("tune_cifar").joinpath("search_spaces"))))
TOP_KEYS = {"model", "mode", "resolution", "description", "budget", "resources", "fixed", "space", "default"}
BUDGET_KEYS = {"max_epochs", "grace_period", "reduction_factor", "num_samples", "time_budget_s", "searcher", "brackets"}
SEARCHERS = ("tpe", "random")
RESOURCE_KEYS = {"gpu", "cpu"}
SEARCHABLE = ("lr", "optimizer", "batch_size", "weight_decay", "momentum", "nesterov", "label_smoothing",
              "warmup", "schedule", "augment", "width", "resolution")
NOT_FIXED = {"model", "mode", "epochs"}          # they have their own keys (top level, budget)
DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice")


@dataclass(frozen=True)
class Dist:
    kind: str            # loguniform | uniform | int | choice
    values: tuple        # (low, high) or the choices

    def to_optuna(self):
        import optuna.distributions as od
        if self.kind == "loguniform":
            return od.FloatDistribution(self.values[0], self.values[1], log=True)
        if self.kind == "uniform":
            return od.FloatDistribution(self.values[0], self.values[1])
        if self.kind == "int":
            return od.IntDistribution(self.values[0], self.values[1])
        return od.CategoricalDistribution(list(self.values))

    def center(self) -> Any:
        if self.kind == "loguniform":
            return math.sqrt(self.values[0] * self.values[1])
        if self.kind == "uniform":
            return (self.values[0] + self.values[1]) / 2
        if self.kind == "int":
            return (self.values[0] + self.values[1]) // 2
        return self.values[0]

    def contains(self, v: Any) -> bool:
        if self.kind == "choice":
            return v in self.values
        return isinstance(v, (int, float)) and not isinstance(v, bool) and self.values[0] <= v <= self.values[1]


@dataclass(frozen=True)
class Budget:
    max_epochs: int = 10
    grace_period: float = 1            # epochs; a multiple of 1/evals_per_epoch (0.5 with 2 evals)
    reduction_factor: float = 3
    num_samples: int = 16
    time_budget_s: float | None = None
    searcher: str = "tpe"              # tpe (Optuna, the default) | random (Ray Tune's BasicVariantGenerator)
    brackets: int = 1                  # ASHA's HyperBand brackets


@dataclass(frozen=True)
class Resources:
    gpu: float = 1.0
    cpu: float = 1.0


@dataclass
class SearchSpec:
    name: str
    source: str
    base: TrainConfig                          # fixed settings + model/mode/resolution, epochs = max_epochs
    budget: Budget
    resources: Resources
    space: dict[str, Dist]
    default: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def optuna_space(self) -> dict[str, Any]:
        return {k: d.to_optuna() for k, d in self.space.items()}

    def default_point(self) -> dict[str, Any]:
        """The known-good point of the file, completed with each range's centre."""
        return {k: self.default.get(k, d.center()) for k, d in self.space.items()}

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec, as written to an experiment's spec.yaml and plan.json."""
        return {"name": self.name, "source": self.source, "description": self.description,
                "base": self.base.to_dict(), "budget": vars(self.budget), "resources": vars(self.resources),
                "space": {k: {d.kind: list(d.values)} for k, d in self.space.items()},
                "default": self.default}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> "SearchSpec":
        """The resolved spec saved by to_dict (plan.json), exactly as it was planned."""
        return cls(d["name"], d["source"], TrainConfig.from_dict(d["base"], where=where), Budget(**d["budget"]),
                   Resources(**d["resources"]),
                   {k: Dist(kind, tuple(values)) for k, v in d["space"].items() for kind, values in v.items()},
                   dict(d.get("default") or {}), d.get("description", ""))


def find_space(name: str) -> Path:
    """NAME is a path to a YAML file, or a stem in search_spaces/ (`simple_cnn` = `simple_cnn_scratch`)."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise UserError(f"search space file {p} does not exist")
        return p
    for d in SPACES_DIRS:
        for stem in (name, f"{name}_scratch"):
            if (d / f"{stem}.yaml").is_file():
                return d / f"{stem}.yaml"
    known = sorted({f.stem for d in SPACES_DIRS if d.is_dir() for f in d.glob("*.yaml")})
    raise UserError(f"unknown search space '{name}' (known: {', '.join(known) or 'none'}; or pass a .yaml path)")


def load_space(name: str) -> SearchSpec:
    path = find_space(name)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None
    return parse_space(raw, str(path), name=path.stem)


def _number(where: str, v: Any, *, integer: bool = False) -> float:
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if not ok or isinstance(v, bool) or (isinstance(v, float) and not math.isfinite(v)):
        raise UserError(f"{where} must be {'an integer' if integer else 'a number'} (got {v!r})")
    return v


def _mapping(where: str, v: Any, allowed: set[str] | None = None) -> dict:
    if not isinstance(v, dict):
        raise UserError(f"{where} must be a mapping (got {type(v).__name__})")
    for k in v:
        if not isinstance(k, str):
            raise UserError(f"{where}: key {k!r} must be a string")
        if allowed is not None and k not in allowed:
            raise UserError(f"{where}: unknown key '{k}' (allowed: {', '.join(sorted(allowed))})")
    return v


def parse_space(raw: Any, source: str, name: str = "space") -> SearchSpec:
    if not isinstance(raw, dict):
        raise UserError(f"{source}: must be a YAML mapping of keys (got {type(raw).__name__})")
    _mapping(source, raw, TOP_KEYS)
    for key in ("model", "mode"):
        if key not in raw:
            raise UserError(f"{source}: missing key '{key}'")
    fixed = dict(_mapping(f"{source}: fixed", raw.get("fixed") or {}))
    for k in fixed:
        if k in NOT_FIXED:
            raise UserError(f"{source}: fixed.{k} is not allowed here (use the top-level key or budget.max_epochs)")

    budget_raw = _mapping(f"{source}: budget", raw.get("budget") or {}, BUDGET_KEYS)
    b = Budget()
    budget = Budget(
        max_epochs=_number(f"{source}: budget.max_epochs", budget_raw.get("max_epochs", b.max_epochs), integer=True),
        grace_period=_number(f"{source}: budget.grace_period", budget_raw.get("grace_period", b.grace_period)),
        reduction_factor=_number(f"{source}: budget.reduction_factor",
                                 budget_raw.get("reduction_factor", b.reduction_factor)),
        num_samples=_number(f"{source}: budget.num_samples", budget_raw.get("num_samples", b.num_samples),
                            integer=True),
        time_budget_s=(None if budget_raw.get("time_budget_s") is None else
                       _number(f"{source}: budget.time_budget_s", budget_raw["time_budget_s"])),
        searcher=budget_raw.get("searcher", b.searcher),
        brackets=_number(f"{source}: budget.brackets", budget_raw.get("brackets", b.brackets), integer=True))
    check_budget(budget, f"{source}: budget.")

    res_raw = _mapping(f"{source}: resources", raw.get("resources") or {}, RESOURCE_KEYS)
    resources = Resources(gpu=_number(f"{source}: resources.gpu", res_raw.get("gpu", 1.0)),
                          cpu=_number(f"{source}: resources.cpu", res_raw.get("cpu", 1.0)))
    check_resources(resources, f"{source}: resources.")

    base_values = dict(fixed, model=raw["model"], mode=raw["mode"], epochs=budget.max_epochs)
    if raw.get("resolution") is not None:
        base_values["resolution"] = raw["resolution"]
    base = TrainConfig.from_dict(base_values, where=source)
    check_rungs(budget, base.evals_per_epoch, f"{source}: budget.")
    check_resolution(source, base, base.resolution)

    space_raw = _mapping(f"{source}: space", raw.get("space") or {})
    if not space_raw:
        raise UserError(f"{source}: space is empty: name at least one hyper-parameter to search")
    space = {k: parse_dist(f"{source}: space.{k}", k, v, base) for k, v in space_raw.items()}
    default = dict(_mapping(f"{source}: default", raw.get("default") or {}))
    for k, v in default.items():
        if k not in space:
            raise UserError(f"{source}: default.{k} is not a searched key (searched: {', '.join(space)})")
        if not space[k].contains(v):
            raise UserError(f"{source}: default.{k}={v!r} lies outside space.{k}")
    description = raw.get("description") or ""
    if not isinstance(description, str):
        raise UserError(f"{source}: description must be a string")
    return SearchSpec(name, source, base, budget, resources, space, default, description)


def parse_dist(where: str, key: str, v: Any, base: TrainConfig) -> Dist:
    if key not in SEARCHABLE:
        raise UserError(f"{where}: '{key}' cannot be searched (searchable: {', '.join(SEARCHABLE)})")
    if not isinstance(v, dict) or len(v) != 1:
        raise UserError(f"{where} must be a one-key mapping: one of {', '.join(DISTRIBUTIONS)}")
    (kind, args), = v.items()
    if kind not in DISTRIBUTIONS:
        raise UserError(f"{where}: unknown distribution '{kind}' (known: {', '.join(DISTRIBUTIONS)})")
    if not isinstance(args, list) or not args:
        raise UserError(f"{where}.{kind} must be a non-empty list")
    if kind == "choice":
        if len(set(map(repr, args))) != len(args):
            raise UserError(f"{where}.choice has repeated values")
        for value in args:
            check_value(f"{where}.choice", key, value, base)
        return Dist(kind, tuple(args))
    if len(args) != 2:
        raise UserError(f"{where}.{kind} must be [low, high]")
    low = _number(f"{where}.{kind} low", args[0], integer=kind == "int")
    high = _number(f"{where}.{kind} high", args[1], integer=kind == "int")
    if kind == "loguniform" and low <= 0:
        raise UserError(f"{where}.loguniform: low must be > 0 (got {low})")
    if low >= high:
        raise UserError(f"{where}.{kind}: low must be < high (got [{low}, {high}])")
    for value in (low, high):
        check_value(f"{where}.{kind}", key, value, base)
    return Dist(kind, (low, high))


def check_value(where: str, key: str, value: Any, base: TrainConfig) -> Any:
    """A searched or given value must make a valid TrainConfig on its own (type and range of that
    field); returns it in the field's type (lr=1 -> 1.0)."""
    from .config import coerce
    value = coerce(key, value, where)
    base.replace(**{key: value}).check(where)
    if key == "resolution":
        check_resolution(where, base, value)
    return value


def check_resolution(where: str, base: TrainConfig, resolution: int | None) -> None:
    from .config import resolve_resolution
    try:
        resolve_resolution(base.model, base.mode, resolution)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def check_budget(b: Budget, prefix: str) -> None:
    if b.max_epochs < 1:
        raise UserError(f"{prefix}max_epochs must be >= 1 (got {b.max_epochs})")
    if not b.grace_period > 0:          # written positively: NaN from a flag fails it
        raise UserError(f"{prefix}grace_period must be > 0 (got {b.grace_period})")
    if b.grace_period > b.max_epochs:
        raise UserError(f"{prefix}grace_period={b.grace_period} is above max_epochs={b.max_epochs}")
    if not b.reduction_factor > 1:
        raise UserError(f"{prefix}reduction_factor must be > 1 (got {b.reduction_factor})")
    if b.num_samples < 1:
        raise UserError(f"{prefix}num_samples must be >= 1 (got {b.num_samples})")
    if b.time_budget_s is not None and not b.time_budget_s > 0:
        raise UserError(f"{prefix}time_budget_s must be > 0 (got {b.time_budget_s})")
    if b.searcher not in SEARCHERS:
        raise UserError(f"{prefix}searcher={b.searcher!r} is not one of {', '.join(SEARCHERS)}")
    if b.brackets < 1:
        raise UserError(f"{prefix}brackets must be >= 1 (got {b.brackets})")


def check_rungs(b: Budget, evals_per_epoch: int, prefix: str) -> None:
    rounds = b.grace_period * evals_per_epoch
    if abs(rounds - round(rounds)) > 1e-9 or round(rounds) < 1:
        raise UserError(f"{prefix}grace_period={b.grace_period} is not a whole number of evaluations "
                        f"(evals_per_epoch={evals_per_epoch})")


def asha_rounds(b: Budget, evals_per_epoch: int) -> tuple[int, int]:
    """(max_t, grace_period) in evaluation rounds, the unit ASHA counts (training_iteration)."""
    return b.max_epochs * evals_per_epoch, int(round(b.grace_period * evals_per_epoch))


def check_resources(r: Resources, prefix: str, gpus_present: int | None = None) -> None:
    if not r.gpu > 0:
        raise UserError(f"{prefix}gpu must be > 0 (got {r.gpu}); it is ignored where no GPU exists")
    if r.gpu > 1 and r.gpu != int(r.gpu):
        raise UserError(f"{prefix}gpu above 1 must be a whole number (got {r.gpu})")
    if gpus_present and r.gpu > gpus_present:
        raise UserError(f"{prefix}gpu={r.gpu} is more than the {gpus_present} GPU(s) present")
    if not r.cpu > 0:
        raise UserError(f"{prefix}cpu must be > 0 (got {r.cpu})")
