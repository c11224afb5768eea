"""Shared fixtures: the real CIFAR-10 (required: missing data fails the suite, never skips it) and
a helper that runs the CLI exactly as a user types it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "tests" / "spaces" / "tiny.yaml")


def data_dir() -> Path:
    d = Path(os.environ.get("TUNE_CIFAR_DATA") or ROOT.parent / "shared" / "cifar10")
    if not (d / "cifar-10-batches-py" / "data_batch_1").exists() and not (d / "data_batch_1").exists():
        pytest.fail(f"real CIFAR-10 not found at {d}: set TUNE_CIFAR_DATA (these tests must not be skipped)")
    return d


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    return data_dir()


@pytest.fixture(scope="session")
def cifar(cifar_dir):
    from tune_cifar.data.sources import load_images
    return load_images(cifar_dir)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    """`python -m tune_cifar ARGS` in a subprocess: (exit status, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "tune_cifar", *map(str, args)], capture_output=True, text=True,
                       cwd=cwd or ROOT, env={**os.environ, **(env or {})}, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture()
def cli(capsys):
    """Run the CLI in this process (so it shares a Ray started by a module fixture)."""
    from tune_cifar.cli import main

    def call(*args: str):
        rc = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return rc, out, err
    return call


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session, shared by the in-process runs that ask for it:
    starting it costs seconds and ~2.5 GiB. (Runs through `run_cli` start their own, as a user's.)"""
    import ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
