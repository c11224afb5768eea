"""The one typed configuration that flows from the CLI / search space through training.

Every field a user can set is checked here (types, ranges, allowed values) so that bad input is a
one-line `UserError` before any data is loaded or Ray is started.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

MODELS = ("simple_cnn", "alexnet", "vgg16", "resnet18")
MODES = ("scratch", "frozen", "full")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("onecycle", "cosine", "constant")
AUGMENTS = ("crop_flip", "flip", "none")
PRECISIONS = ("auto", "fp32", "bf16")


class UserError(ValueError):
    """Bad input from the user: the CLI prints it as one line and exits with status 2."""


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
    precision: str = "auto"            # auto: bf16 on CUDA for the big nets, fp32 otherwise
    threads: int | None = None         # intra-op CPU threads; None = torch's default

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config") -> "TrainConfig":
        """Build and validate; unknown keys and bad values raise UserError naming `where` and the key."""
        known = {f.name for f in fields(cls)}
        for key in values:
            if key not in known:
                raise UserError(f"{where}: unknown key '{key}' (known: {', '.join(sorted(known))})")
        cfg = cls(**{k: coerce(k, v, where) for k, v in values.items()})
        cfg.check(where)
        return cfg

    def check(self, where: str = "config") -> None:
        def bad(key: str, why: str) -> UserError:
            return UserError(f"{where}: {key}={getattr(self, key)!r} {why}")

        for key, allowed in (("model", MODELS), ("mode", MODES), ("optimizer", OPTIMIZERS),
                             ("schedule", SCHEDULES), ("augment", AUGMENTS), ("precision", PRECISIONS)):
            if getattr(self, key) not in allowed:
                raise bad(key, f"is not one of {', '.join(allowed)}")
        if self.model == "simple_cnn" and self.mode != "scratch":
            raise bad("mode", "is not available for simple_cnn: it has no pretrained weights (use scratch)")
        if not 1 <= self.evals_per_epoch <= 20:
            raise bad("evals_per_epoch", "must be between 1 and 20")
        for key in ("epochs", "batch_size", "width"):
            if getattr(self, key) < 1:
                raise bad(key, "must be a positive integer")
        if self.lr <= 0 or self.lr > 10:
            raise bad("lr", "must be in (0, 10]")
        if not 0 <= self.momentum < 1:
            raise bad("momentum", "must be in [0, 1)")
        if not 0 <= self.weight_decay < 1:
            raise bad("weight_decay", "must be in [0, 1)")
        if not 0 <= self.warmup < 1:
            raise bad("warmup", "must be in [0, 1)")
        if not 0 <= self.label_smoothing < 1:
            raise bad("label_smoothing", "must be in [0, 1)")
        if not 0 < self.val_fraction < 1:
            raise bad("val_fraction", "must be in (0, 1)")
        if self.patience < 0:
            raise bad("patience", "must be >= 0")
        if self.subset is not None and self.subset < 1:
            raise bad("subset", "must be a positive integer")
        if self.resolution is not None and not 16 <= self.resolution <= 512:
            raise bad("resolution", "must be between 16 and 512 pixels")
        if self.threads is not None and self.threads < 1:
            raise bad("threads", "must be a positive integer")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise bad("device", "is not one of auto, cpu, cuda, cuda:N")


_TYPES = {f.name: f.type for f in fields(TrainConfig)}


def coerce(key: str, value: Any, where: str) -> Any:
    """Check a value's type for `key` (YAML / CLI strings already parsed); ints are fine as floats."""
    kind = _TYPES[key]
    optional = "None" in kind
    if value is None:
        if optional:
            return None
        raise UserError(f"{where}: {key} must not be empty")
    base = kind.replace(" | None", "")
    if base == "bool":
        ok = isinstance(value, bool)
    elif base == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise UserError(f"{where}: {key}={value!r} must be of type {base}")
    return value


def typed(key: str, value: Any) -> Any:
    """A hyper-parameter read back from a CSV, in its field's type (pandas turns an int column with
    a missing value into floats: batch_size 128 -> 128.0)."""
    if hasattr(value, "item"):
        value = value.item()
    if _TYPES[key].startswith("int") and isinstance(value, float) and value.is_integer():
        return int(value)
    return value
