"""`bench`: what a GPU-hour (or a CPU-hour) buys, measured as ratios within one run.

`bench --accept` runs every acceptance part (accept.py, parts.py) at the sizes of this kind of
machine (sizes.py) and checks each against its target; `bench --only p2,rungs` runs the named parts
and studies (studies.py) the same way. On a CPU the big parts run scaled down; every row says what
it ran. Writes OUT.json (every number) and OUT.md (the tables, also printed).
"""
from __future__ import annotations

import dataclasses
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..core.config import UserError
from ..results.folders import write_json, write_text
from . import studies
from .accept import ORDER, parts_markdown, run_parts, studies_markdown
from .parts import Bench, small_cifar
from .sizes import SIZES, sizes_key

STUDIES = ("cpu_budget", "search_quality", "rungs", "racing", "final_model")
CHOICES = (*ORDER, *STUDIES)


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def chosen_parts(only: str | None, accept: bool) -> set[str]:
    if accept and only:
        raise UserError("--accept runs the fixed acceptance set: leave out --only")
    if not only:
        return set(ORDER)
    chosen = {p.strip().lower() for p in only.split(",") if p.strip()}
    if not chosen or not chosen <= set(CHOICES):
        raise UserError(f"--only {only}: parts are {', '.join(CHOICES)}")
    return chosen


def start_shared_ray() -> dict[str, Any]:
    """The one Ray bench's searches share (each search's start_ray finds it running): started where
    every command starts its Ray (tuning/ray_session.start_ray), so an embedded one with this
    machine's CPUs even beside a `ray start` cluster, or the cluster $RAY_ADDRESS names."""
    from ..tuning.ray_session import RayOptions, start_ray
    return start_ray(RayOptions(num_cpus=os.cpu_count()))


def run_study(study: str, b: Bench, quick: bool, checkpoint) -> dict[str, Any]:
    """One study; `checkpoint(result so far)` keeps OUT.json up to date during the long ones."""
    if study == "cpu_budget":
        return studies.cpu_budget(b)
    if study == "racing":
        from .racing import racing
        return racing(b, quick, checkpoint)
    if study == "final_model":
        from .final_model import final_model
        return final_model(b, quick)
    return getattr(studies, study)(b, quick)


def run_bench(cli: Callable[[list], int], device: str | None = None, quick: bool = False,
              out: Path = Path("bench.json"), only: str | None = None, data_dir: str | None = None,
              accept: bool = False, work_dir: Path | None = None) -> dict[str, Any]:
    """Run the chosen parts and studies; `cli` is the CLI's own entry (searches run through it);
    `work_dir`: where the experiments go (default: a new temporary folder), and a later run reuses
    the ones that finished there."""
    from ..data.readers import synthetic_images
    from ..data.sources import load_images, resolve_data_dir
    from ..data.store import device_of
    from ..tuning.ray_session import stop_ray

    chosen = chosen_parts(only, accept)
    dev = device_of(device or "auto")
    searches = bool(chosen - {"p1", "p4", "p4c"})
    if accept or searches:
        images = load_images(data_dir)          # the searches need the real data: an error without it
        data_dir = resolve_data_dir(data_dir, False)
    else:
        try:
            images = load_images(data_dir)
        except UserError:
            images = synthetic_images()          # P1 and P4 need only same-shape data
    key = sizes_key(dev, quick)
    z = SIZES[key]
    work = Path(work_dir).resolve() if work_dir else Path(tempfile.mkdtemp(prefix="tune_cifar_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    studies_bench = Bench(dev, z, key, data_dir, work, images, cli)
    b = studies_bench
    if z.small_data and searches and chosen & set(ORDER):       # the acceptance parts' own small copy
        b = dataclasses.replace(b, data_dir=small_cifar(images, work / "cifar10_small", *z.small_data))
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "device": device_name(dev),
                               "torch": torch.__version__, "quick": quick, "data": data_dir or images.source}
    ray_facts: dict[str, Any] | None = None

    def shared_ray() -> None:
        """--quick: one Ray session (the one place that starts Ray: ray_session.start_ray) shared by
        the searches, started after the parts without Ray so its start-up slows none of them."""
        nonlocal ray_facts
        if quick and ray_facts is None:
            ray_facts = start_shared_ray()
    t_all = time.perf_counter()
    try:
        rows = run_parts(b, chosen, shared_ray)
        for study in STUDIES:
            if study in chosen and not (study == "cpu_budget" and dev.type != "cpu"):
                shared_ray()
                results[study] = run_study(study, studies_bench, quick,
                                           lambda r, s=study: write_json(out, {**results, s: r}))
    finally:
        if ray_facts is not None:
            stop_ray(ray_facts)
    verdicts = [p["verdict"] for p in rows]
    results["accept"] = {"sizes": key, "note": z.note, "data": b.data_dir, "parts": rows,
                         "total_s": round(time.perf_counter() - t_all, 1),
                         "passed": verdicts.count("pass"), "failed": verdicts.count("fail")}
    md = parts_markdown(results) + studies_markdown(results)
    write_json(out, results)
    write_text(Path(out).with_suffix(".md"), md)
    print(md)
    return results
