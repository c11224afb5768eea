"""`--gpus-per-trial auto`: the sharing decision from given memory figures (no GPU needed)."""
from __future__ import annotations

import pytest
import torch

from tune_cifar.training import gpu_share
from tune_cifar.training.gpu_share import GIB, RAY_RESOURCE_UNITS, auto_share, decide, gpu_fraction, trials_per_gpu

H100 = 80 * GIB


def ray_units(fraction: float) -> int:
    """How the raylet stores a resource quantity: FixedPoint(d) = int(d * 10_000 + 0.5)."""
    return int(fraction * RAY_RESOURCE_UNITS + 0.5)


def test_ray_resource_unit_is_what_ray_uses():
    import ray._raylet
    assert RAY_RESOURCE_UNITS == ray._raylet.RESOURCE_UNIT_SCALING


@pytest.mark.parametrize("n", range(1, 65))
def test_n_fractions_fit_one_gpu_in_rays_accounting(n):
    f = gpu_fraction(n)
    assert f == round(f, 4) and 0 < f <= 1 / n
    assert n * ray_units(f) <= RAY_RESOURCE_UNITS                 # n trials fit on one GPU ...
    assert (n + 1) * ray_units(f) > RAY_RESOURCE_UNITS              # ... and not one more
    assert ray_units(f) >= 1 and int(f * RAY_RESOURCE_UNITS) >= 1   # ray.remote's "precision" check


def test_fraction_values():
    assert gpu_fraction(1) == 1.0 and gpu_fraction(3) == 0.3333 and gpu_fraction(8) == 0.125
    assert gpu_fraction(6) == 0.1666              # round(1/6, 4) = 0.1667 would make 6 trials need 1.0002 GPUs
    with pytest.raises(ValueError):
        gpu_fraction(0)


def test_small_peak_is_capped():
    d = decide(3 * GIB, H100)
    assert d["trials_per_gpu"] == 8 and d["gpus_per_trial"] == 0.125
    assert d["peak_gib"] == 3.0 and d["total_gib"] == 80.0 and "capped at 8" in d["note"]
    assert trials_per_gpu(3 * GIB, H100, max_trials=100) == 16      # 0.8 * 80 // (3 + 1)


def test_large_peak_shares_three_ways():
    d = decide(20 * GIB, H100)
    assert d["trials_per_gpu"] == 3 and d["gpus_per_trial"] == 0.3333
    assert 3 * d["gpus_per_trial"] <= 1 and "3 trials per GPU" in d["note"] and "capped" not in d["note"]


def test_peak_larger_than_the_gpu_gets_a_whole_gpu_and_a_note():
    d = decide(90 * GIB, H100)
    assert d["trials_per_gpu"] == 1 and d["gpus_per_trial"] == 1.0
    assert "does not fit" in d["note"] and "whole GPU" in d["note"]
    # fits alone within the margin: one trial, no warning
    d = decide(40 * GIB, H100)
    assert d["trials_per_gpu"] == 1 and "does not fit" not in d["note"]


def test_arithmetic_edges():
    # exactly at the budget: 4 * (15 + 1) = 64 = 0.8 * 80
    assert trials_per_gpu(15 * GIB, H100) == 4
    assert trials_per_gpu(15 * GIB + 1, H100) == 3
    assert trials_per_gpu(7 * GIB, H100, reserved_bytes=0, safety=1.0) == 8     # capped, 11 would fit
    assert trials_per_gpu(7 * GIB, H100, reserved_bytes=0, safety=1.0, max_trials=20) == 11
    for bad in ({"safety": 0}, {"safety": 1.5}, {"max_trials": 0}, {"reserved_bytes": -1}):
        with pytest.raises(ValueError):
            trials_per_gpu(GIB, H100, **bad)
    with pytest.raises(ValueError):
        trials_per_gpu(0, H100)


def test_cpu_only_never_measures(monkeypatch):
    def boom(*_, **__):
        raise AssertionError("measured on a CPU-only machine")
    monkeypatch.setattr(gpu_share, "measure_peak_bytes", boom)
    assert auto_share(0, boom) == {"gpus_per_trial": 0, "note": "no GPU: trials run on the CPU"}
    assert auto_share(0, None)["gpus_per_trial"] == 0


def test_gpu_machine_measures_once_and_decides():
    calls = []

    def measure():
        calls.append(1)
        return 20 * GIB, H100
    d = auto_share(2, measure)
    assert calls == [1] and d == decide(20 * GIB, H100)
    with pytest.raises(ValueError, match="no measure"):
        auto_share(1, None)


def test_measure_peak_bytes_warms_up_then_measures_one_step(monkeypatch):
    """The CUDA calls are replaced by a fake allocator log: warm-up, reset, measured step, read."""
    log = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: log.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: log.append("read") or 123)
    assert gpu_share.measure_peak_bytes(lambda: log.append("step"), "cuda:0") == 123
    assert log == ["step", "sync", "reset", "step", "sync", "read"]
    with pytest.raises(ValueError, match="CUDA"):
        gpu_share.measure_peak_bytes(lambda: None, "cpu")
