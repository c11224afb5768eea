"""The final model of an experiment: the predictor that is tested once, saved and exported.

Kinds: `best_trial` (plain `search`: the best trial's checkpoint), `train` (the `train` command's
model), `retrain` (`search --cv-top`: the cross-validated winner retrained on the whole pool) and
`bagging` (`search --cv-top --final bagging`: the winner's J split models of the cross-validation,
each trained on its part of the pool, their softmax averaged; no extra training).
`tta`: `none`, or `flip`: the mean of the softmax for the image and for its horizontal mirror.

Every predictor is a plain torch nn.Module, so one module holds the whole final model (the members,
the averaging and the mirrored view) and torch.export / torch.onnx export it as one graph. A single
model without TTA is the network itself (its logits, as before); an ensemble or a TTA wrapper
returns log-probabilities: log of the mean softmax, computed with logsumexp (exact and stable), so
its argmax is the prediction and cross-entropy on it is the ensemble's negative log-likelihood.

Imports nothing from Ray and writes nothing: the commands save `record()` with results/folders.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.config import TrainConfig
from ..core.finals import KINDS, check_tta



def mean_softmax(log_probs: list[torch.Tensor]) -> torch.Tensor:
    """log(mean_i softmax_i) from per-view / per-member log-probabilities (B, C), in fp32."""
    stacked = torch.stack([lp.float() for lp in log_probs])
    return torch.logsumexp(stacked, dim=0) - math.log(len(log_probs))


class Bagged(nn.Module):
    """The members' softmax averaged: log of the mean of softmax(member(x))."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mean_softmax([F.log_softmax(m(x).float(), dim=1) for m in self.members])


class FlipTTA(nn.Module):
    """Test-time augmentation: the mean softmax of `inner` on the image and on its horizontal mirror
    (the last axis of NCHW; normalisation is per channel, so mirroring the normalised input is
    mirroring the image)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = [self.inner(x), self.inner(torch.flip(x, dims=[3]))]
        return mean_softmax([F.log_softmax(v.float(), dim=1) for v in views])


def predictor(models: list[nn.Module], tta: str = "none") -> nn.Module:
    """One module: the single model itself, their ensemble (Bagged), either wrapped in FlipTTA."""
    check_tta(tta)
    inner = models[0] if len(models) == 1 else Bagged(models)
    return FlipTTA(inner) if tta == "flip" else inner


@dataclass
class Member:
    """One trained network of the final model, with its config and where it came from."""
    config: TrainConfig
    model: nn.Module
    about: dict[str, Any] = field(default_factory=dict)     # e.g. the fold, the trial, its validation accuracy


@dataclass
class FinalModel:
    kind: str
    tta: str
    members: list[Member]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"final kind {self.kind!r} is not one of {KINDS}")
        if self.kind != "bagging" and len(self.members) != 1:
            raise ValueError(f"a {self.kind} final model has one member, not {len(self.members)}")
        check_tta(self.tta)

    @property
    def config(self) -> TrainConfig:
        return self.members[0].config

    def predictor(self) -> nn.Module:
        return predictor([m.model.eval() for m in self.members], self.tta).eval()

    def summary(self) -> dict[str, Any]:
        """What best.json / metrics.json record as `final`."""
        return {"kind": self.kind, "tta": self.tta, "n_members": len(self.members),
                "members": [m.about for m in self.members],
                "output": "logits" if len(self.members) == 1 and self.tta == "none" else "log_probs"}

    def record(self, classes: list[str]) -> dict[str, Any]:
        """best_model.pt / model.pt: plain tensors and data (torch.load(weights_only=True) reads it).
        A single model keeps the top-level "model" state dict it always had; an ensemble has its
        members' state dicts and configs under "members"."""
        out: dict[str, Any] = {"config": self.config.to_dict(), "classes": list(classes), "final": self.summary()}
        if self.kind == "bagging":
            out["members"] = [{"model": state_of(m.model), "config": m.config.to_dict(), "about": m.about}
                              for m in self.members]
        else:
            out["model"] = state_of(self.members[0].model)
        return out

    @classmethod
    def from_record(cls, saved: dict[str, Any], where: str) -> "FinalModel":
        """The final model of a saved record (also a best_model.pt / model.pt from before `final`
        existed: one model, no TTA)."""
        from .models import architecture
        legacy = "train" if Path(where).name == "model.pt" else "best_trial"
        final = saved.get("final") or {"kind": legacy, "tta": "none"}
        n = len(saved["classes"])
        entries = saved["members"] if "members" in saved else [{"model": saved["model"], "config": saved["config"],
                                                                 "about": (final.get("members") or [{}])[0]}]
        members = []
        for e in entries:
            cfg = TrainConfig.from_dict(e["config"], where=where)
            model = architecture(cfg.model, cfg.mode, n, cfg.width)
            model.load_state_dict(e["model"])
            members.append(Member(cfg, model.eval(), dict(e.get("about") or {})))
        return cls(final["kind"], final.get("tta", "none"), members)


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}
