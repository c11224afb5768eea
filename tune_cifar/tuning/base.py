"""The config every trial of an experiment starts from: the flags search and kfold share checked,
the data found, the weights checked, the per-trial resources decided (--gpus-per-trial auto measures
one training step here). Nothing is written or started."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.config import TrainConfig
from .plan import RunOptions, check_flags
from .ray_session import threads_for, trial_resources


def prepare_base(spec, opts: RunOptions, where: str, **changes: Any) -> tuple[TrainConfig, dict[str, Any], str]:
    """Check the flags search and kfold share, find the data, and pin the config every trial starts
    from: (config, per-trial resources, absolute data folder). Nothing is written or started.

    --gpus-per-trial auto is decided here, once the data is found (`gpu_share.plan_share`: one
    measured training step of the space's heaviest trial on the first GPU; 0 without a GPU), printed,
    and recorded in the resources as "gpu_share" (so plan.json and best.json keep it)."""
    from ..data.cache import check_data
    from ..data.sources import downloads_allowed, resolve_data_dir
    from ..training.models import check_weights

    check_flags(opts, ("subset", "max_failures"))
    auto = opts.gpus_per_trial == "auto"
    resources: dict[str, Any] = trial_resources(None if auto else opts.gpus_per_trial, opts.cpus_per_trial,
                                                spec.resources, opts.ray)
    download = downloads_allowed(opts.download, opts.offline)
    data_dir = resolve_data_dir(opts.data_dir, download)
    values: dict[str, Any] = {"data_dir": data_dir, "download": False, **changes}
    if opts.weights:
        values["weights"] = str(Path(opts.weights).resolve())
    else:
        values["download"] = download     # ImageNet weights: torchvision's cache, else downloaded
    base = spec.base.replace(**values)
    base.check(where)
    if opts.subset is None and base.subset is not None:      # a preset's subset (--quick), not the user's
        base = fit_preset_subset(base)
    check_data(base)
    check_weights(base)
    if auto:
        from ..training.gpu_share import plan_share
        from .ray_session import gpus_present
        share = plan_share(spec, base, gpus_present(), opts.ray.joins_cluster())
        print(f"--gpus-per-trial auto: {share['note']}", flush=True)
        if share["gpus_per_trial"]:
            resources = trial_resources(share["gpus_per_trial"], opts.cpus_per_trial, spec.resources, opts.ray)
        resources["gpu_share"] = share
    if "threads" not in changes:
        base = base.replace(threads=threads_for(resources) if not resources["gpu"] else None)
    return base, resources, data_dir


def fit_preset_subset(base: TrainConfig) -> TrainConfig:
    """--quick's subset capped at the data's training images, with a note (core/fitting.py)."""
    from ..core.fitting import fit_subset
    from ..data.cache import training_labels
    subset, note = fit_subset(base.subset, len(training_labels(base)))
    if note:
        print(note, flush=True)
    return base.replace(subset=subset)
