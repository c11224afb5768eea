"""The one typed configuration that flows from the CLI / search space through training.

Every field a user can set is checked here (types, ranges, allowed values) so that bad input is a
one-line `UserError` before any data is loaded or Ray is started.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Callable

MODELS = ("simple_cnn", "alexnet", "vgg16", "resnet18")
# What each architecture takes as input, in pixels: (smallest sensible input when trained from
# scratch, the size below which its pooling fails). Pretrained modes default to 224 px, what the
# ImageNet weights were trained at. Kept here, with no torch, so that search spaces and the data
# layer can size inputs without asking the model registry.
INPUT_SIZES = {"simple_cnn": (32, 16), "alexnet": (64, 63), "vgg16": (32, 32), "resnet18": (32, 32)}
PRETRAINED_RESOLUTION = 224
MODES = ("scratch", "frozen", "full")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("onecycle", "cosine", "constant")
AUGMENTS = ("crop_flip", "flip", "none")
PRECISIONS = ("auto", "fp32", "bf16")


class UserError(ValueError):
    """Bad input from the user: the CLI prints it as one line and exits with status 2."""


def min_resolution(model: str) -> int:
    """The smallest input `model` takes (its pooling fails below)."""
    if model not in INPUT_SIZES:
        raise UserError(f"unknown model '{model}' (known: {', '.join(MODELS)})")
    return INPUT_SIZES[model][1]


def default_resolution(model: str, mode: str) -> int:
    min_resolution(model)
    return INPUT_SIZES[model][0] if mode == "scratch" else PRETRAINED_RESOLUTION


def resolve_resolution(model: str, mode: str, resolution: int | None) -> int:
    """The input resolution a model x mode trains at: `resolution`, else its default; too small is an error."""
    res = resolution or default_resolution(model, mode)
    if res < min_resolution(model):
        raise UserError(f"resolution={res} is too small for {model} (its pooling needs >= {min_resolution(model)} px)")
    return res


@dataclass
class TrainConfig:
    # what is trained
    model: str = "simple_cnn"
    mode: str = "scratch"              # scratch | frozen (backbone fixed, new head) | full (fine-tune)
    resolution: int | None = None      # input size; None = the model x mode default (models.py)
    width: int = 64                    # simple_cnn only: channels of the first block (x2, x4 deeper)
    weights: str | None = None         # state-dict file for frozen/full; None = torchvision's
    download: bool = False             # may torchvision download data / weights?
    # optimisation
    epochs: int = 10
    batch_size: int = 256
    optimizer: str = "sgd"
    lr: float = 0.05                   # peak learning rate (one-cycle) / initial (cosine, constant)
    momentum: float = 0.9              # sgd momentum; adam/adamw beta1
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    warmup: float = 0.2                # fraction of all steps spent warming up
    label_smoothing: float = 0.1
    augment: str = "crop_flip"
    patience: int = 0                  # early stopping on validation loss (in evaluations); 0 = off
    evals_per_epoch: int = 1           # validate (and report to ASHA) this often per epoch
    # data
    data_dir: str | None = None
    subset: int | None = None          # stratified subset of the 50,000 training images
    val_fraction: float = 0.1          # held-out validation share of the (subset of the) train set
    split_seed: int = 0                # fixes subset + validation split: equal for every trial
    seed: int = 0                      # weights init, augmentation, batch order
    # execution
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    precision: str = "auto"            # auto: bf16 on CUDA for the big nets and on bf16 CPUs, else fp32
    threads: int | None = None         # intra-op CPU threads; None = torch's default

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config") -> "TrainConfig":
        """Build and validate; unknown keys and bad values raise UserError naming `where` and the key."""
        for key in values:
            check_known(key, where)
        cfg = cls(**{k: coerce(k, v, where) for k, v in values.items()})
        cfg.check(where)
        return cfg

    def check(self, where: str = "config") -> None:
        """Every field against its rule in RULES, then the one rule that joins two fields."""
        for key, (ok, why) in RULES.items():
            value = getattr(self, key)
            if value is not None and not ok(value):
                raise UserError(f"{where}: {key}={value!r} {why}")
        if self.model == "simple_cnn" and self.mode != "scratch":
            raise UserError(f"{where}: mode={self.mode!r} is not available for simple_cnn: it has no pretrained "
                            "weights (use scratch)")


def one_of(*allowed: str) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in allowed), f"is not one of {', '.join(allowed)}"


def between(low: float, high: float, *, low_open: bool = False, high_open: bool = False
            ) -> tuple[Callable[[Any], bool], str]:
    """A range check written positively, so NaN (which fails every comparison) is refused."""
    def ok(v: float) -> bool:
        return (low < v if low_open else low <= v) and (v < high if high_open else v <= high)
    return ok, f"must be in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


POSITIVE = (lambda v: v >= 1), "must be a positive integer"

# One rule per field a user can set: (accepts the value?, what to say when it does not). A None
# value of an optional field is not checked. Types are checked before, by coerce().
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model": one_of(*MODELS),
    "mode": one_of(*MODES),
    "optimizer": one_of(*OPTIMIZERS),
    "schedule": one_of(*SCHEDULES),
    "augment": one_of(*AUGMENTS),
    "precision": one_of(*PRECISIONS),
    "device": ((lambda v: v in ("auto", "cpu", "cuda") or v.startswith("cuda:")),
               "is not one of auto, cpu, cuda, cuda:N"),
    "evals_per_epoch": between(1, 20),
    "epochs": POSITIVE,
    "batch_size": POSITIVE,
    "width": POSITIVE,
    "subset": POSITIVE,
    "threads": POSITIVE,
    "lr": between(0, 10, low_open=True),
    "momentum": between(0, 1, high_open=True),
    "weight_decay": between(0, 1, high_open=True),
    "warmup": between(0, 1, high_open=True),
    "label_smoothing": between(0, 1, high_open=True),
    "val_fraction": between(0, 1, low_open=True, high_open=True),
    "patience": ((lambda v: v >= 0), "must be >= 0"),
    "resolution": between(16, 512),
}
TYPES = typing.get_type_hints(TrainConfig)


def check_known(key: str, where: str) -> None:
    if key not in TYPES:
        raise UserError(f"{where}: unknown key '{key}' (known: {', '.join(sorted(TYPES))})")


def coerce(key: str, value: Any, where: str) -> Any:
    """`value` in the type of field `key` (YAML / CLI strings already parsed): ints are accepted for
    floats and become floats (lr=1 -> 1.0); anything else of the wrong type is a UserError."""
    check_known(key, where)
    kinds = typing.get_args(TYPES[key]) or (TYPES[key],)
    if value is None:
        if type(None) in kinds:
            return None
        raise UserError(f"{where}: {key} must not be empty")
    kind = next(k for k in kinds if k is not type(None))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not kind:          # exact: a bool is not an int here
        raise UserError(f"{where}: {key}={value!r} must be of type {kind.__name__}")
    return value


def value_from_csv(key: str, value: Any) -> Any:
    """A hyper-parameter read back from a CSV, in its field's type (pandas turns an int column with
    a missing value into floats: batch_size 128 -> 128.0)."""
    if hasattr(value, "item"):
        value = value.item()
    if TYPES[key] is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value
