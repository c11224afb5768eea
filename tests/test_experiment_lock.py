"""One driver per experiment (issue 21, item 2): a second writer of a running experiment (search,
--resume, --overwrite, kfold, train) exits 2 with one line naming the holder's pid and host and
changes nothing; report and export read a locked experiment; a holder killed with SIGKILL leaves a
lock file that blocks nobody, even while the Ray processes it started live on."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, TINY, run_cli

from tune_cifar.results import lock

HOST = socket.gethostname()
OK = {"completed", "stopped", "early_stopped"}
HOLD = ("import sys, time; from tune_cifar.results import lock; lock.acquire(sys.argv[1], 'the test holder'); "
        "print('held', flush=True); time.sleep(3600)")


def hold(exp: Path) -> subprocess.Popen:
    """Another process that takes the lock of `exp` through the lock module and keeps it until killed."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(exp)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def kill(p: subprocess.Popen) -> None:
    p.kill()
    p.wait()


def one_line_naming(err: str, pid: int) -> bool:
    return len(err.strip().splitlines()) == 1 and f"pid {pid} on host {HOST}" in err and "in use" in err


def test_lock_is_exclusive_between_processes_and_dies_with_its_holder(tmp_path):
    exp = tmp_path / "results" / "exp"
    holder = hold(exp)
    try:
        assert lock.holder(exp)["pid"] == holder.pid and lock.holder(exp)["host"] == HOST
        with pytest.raises(lock.ExperimentLocked) as refused:
            lock.acquire(exp)
        assert f"pid {holder.pid} on host {HOST} since " in str(refused.value)
        assert "the test holder" in str(refused.value)
        with pytest.raises(lock.ExperimentLocked):
            lock.check_unlocked(exp)               # looking takes nothing and writes nothing
        assert not exp.exists()
    finally:
        kill(holder)                               # SIGKILL: nothing is cleaned up by the holder
    assert json.loads(lock.lock_file(exp).read_text())["pid"] == holder.pid   # stale contents ...
    assert lock.holder(exp) is None                                           # ... but no lock
    with lock.command_scope():
        lock.acquire(exp)
        assert json.loads(lock.lock_file(exp).read_text())["pid"] == os.getpid()
        lock.acquire(exp)                          # the same process again: reentrant
        lock.acquire(exp / "cv")                   # a stage inside it: covered, no second lock file
        assert lock.holds(exp / "cv") and not lock.lock_file(exp / "cv").exists()
        child = subprocess.run([sys.executable, "-c", "import sys; from tune_cifar.results import lock; "
                                "lock.acquire(sys.argv[1])", str(exp)], cwd=ROOT, capture_output=True, text=True)
        assert child.returncode != 0 and f"pid {os.getpid()}" in child.stderr
    assert not lock.holds(exp)                     # the command's scope gave every taking back
    holder = hold(exp)                             # and another process can take it now
    kill(holder)


def test_garbage_in_a_free_lock_file_blocks_nothing(tmp_path):
    exp = tmp_path / "exp"
    lock.lock_file(exp).write_text("{not json")
    assert lock.holder(exp) is None
    with lock.command_scope():
        lock.acquire(exp)
    holder = hold(exp)
    try:
        with pytest.raises(lock.ExperimentLocked, match=f"pid {holder.pid}"):
            lock.acquire(exp)
    finally:
        kill(holder)


def search_args(cifar_dir, results: Path, name: str, *extra):
    return ("search", TINY, "--data-dir", cifar_dir, "--subset", 1500, "--results-dir", results, "--name", name,
            "--no-report", "--no-tensorboard", *extra)


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 600) -> None:
    import time
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the driver ended before {what}:\n{proc.stdout.read()[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def started_trials(exp: Path) -> int:
    return len(list((exp / "tune").glob("trial_*/progress.csv")))


@pytest.fixture(scope="module")
def contended(ray_session, tmp_path_factory, cifar_dir):
    """A search running as its own driver (on the module's Ray), and, while it holds its lock, a second
    `search --resume`, `search --overwrite`, `kfold` of the same folder and `train` into it, all at once;
    the first is then stopped with SIGTERM and resumed to the end. Returns what each step saw."""
    results = tmp_path_factory.mktemp("locked")
    exp = results / "run"
    args = search_args(cifar_dir, results, "run", "--num-samples", 10)
    first = subprocess.Popen([sys.executable, "-m", "tune_cifar", *map(str, args), "--address", ray_session],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (lock.holder(exp) or {}).get("pid") == first.pid and started_trials(exp) >= 1, first,
                 "the first search to hold the lock and start a trial")
        before = {f: (exp / f).read_bytes() for f in ("plan.json", "spec.yaml")}
        seconds = [subprocess.Popen([sys.executable, "-m", "tune_cifar", *map(str, cmd)], cwd=ROOT, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                   for cmd in (args + ("--resume",), args + ("--overwrite",),
                               ("kfold", TINY, "--k", 2, "--epochs", 1, "--data-dir", cifar_dir, "--subset", 1500,
                                "--results-dir", results, "--name", "run", "--overwrite"),
                               ("train", TINY, "--epochs", 1, "--data-dir", cifar_dir, "--subset", 1500,
                                "--results-dir", results, "--name", "run", "--overwrite"))]
        refused = [(p.wait(timeout=600), *p.communicate()) for p in seconds]
        first_alive = first.poll() is None
        after = {f: (exp / f).read_bytes() for f in before}
        first.send_signal(signal.SIGTERM)           # stops like `ray job stop`: Tune saves its state
        first_out = first.communicate(timeout=600)[0]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    return {"exp": exp, "args": args, "pid": first.pid, "refused": refused, "first_alive": first_alive,
            "unchanged": before == after, "first_rc": first.returncode, "first_out": first_out}


@pytest.mark.slow
def test_second_writers_are_refused_and_change_nothing(contended):
    assert contended["first_alive"]      # the test's premise: every refusal came while the first ran
    for rc, out, err in contended["refused"]:
        assert rc == 2 and one_line_naming(err, contended["pid"]), (rc, out[-2000:], err[-2000:])
    assert contended["unchanged"]        # plan.json, spec.yaml as the first search wrote them


@pytest.mark.slow
def test_a_search_stopped_by_sigterm_resumes_to_the_end(contended, cli):
    exp = contended["exp"]
    assert contended["first_rc"] == 130 and "--resume" in contended["first_out"], contended["first_out"][-3000:]
    assert "SIGTERM: stopping the trials" in contended["first_out"]
    assert not (exp / "best.json").exists() and not (exp / "trials.csv").exists()    # no test of a half search
    rc, out, err = cli(*contended["args"], "--resume")
    assert rc == 0, err[-3000:]
    trials = pd.read_csv(exp / "trials.csv")
    assert len(trials) == 10 and set(trials["status"]) <= OK, trials["status"].tolist()
    history = pd.read_csv(exp / "history.csv")
    assert not history.duplicated(["trial_id", "round"]).any()
    for progress in (exp / "tune").glob("trial_*/progress.csv"):       # no round ran twice
        assert not pd.read_csv(progress)["training_iteration"].duplicated().any(), progress
    assert re.findall("^test_acc=", out, re.M) == ["test_acc="]          # the test set, once
    assert json.loads((exp / "best.json").read_text())["test_acc"] > 0.1


@pytest.mark.slow
def test_report_and_export_read_a_locked_experiment(contended, cli):
    exp = contended["exp"]
    if not (exp / "best.json").exists():
        assert cli(*contended["args"], "--resume")[0] == 0
    holder = hold(exp)
    try:
        rc, out, err = run_cli("report", exp.name, "--results-dir", exp.parent)
        assert rc == 0 and (exp / "report.md").is_file(), err[-3000:]
        rc, out, err = run_cli("export", exp.name, "--results-dir", exp.parent, "--format", "pt",
                               "--out", exp.parent / "model.pt")
        assert rc == 0 and (exp.parent / "model.pt").is_file(), err[-3000:]
        rc, out, err = run_cli(*contended["args"], "--resume")          # a writer still is not
        assert rc == 2 and one_line_naming(err, holder.pid), err
    finally:
        kill(holder)
    rc, out, err = run_cli(*contended["args"], "--resume")              # killed: the lock is free
    assert rc == 0 and "already finished" in out, err[-3000:]


@pytest.mark.slow
def test_a_killed_driver_with_its_own_ray_leaves_no_lock(ray_session, tmp_path, cifar_dir, cli):
    """The driver starts its own embedded Ray (raylet, workers: its children); after kill -9 of the
    driver what of them lives on must not have inherited the lock."""
    import ray  # noqa: F401, I001  (first: it puts its own psutil, ray/thirdparty_files, on the path)
    import psutil
    exp = tmp_path / "killed"
    args = search_args(cifar_dir, tmp_path, "killed", "--num-samples", 3)
    driver = subprocess.Popen([sys.executable, "-m", "tune_cifar", *map(str, args)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    left: list = []
    try:
        wait_for(lambda: len(list((exp / "tune").glob("trial_*/checkpoint_*"))) >= 1, driver,
                 "a trial checkpoint")
        left = psutil.Process(driver.pid).children(recursive=True)
        assert left                                             # its Ray runs in processes of its own
        driver.kill()
        driver.wait()
        assert json.loads(lock.lock_file(exp).read_text())["pid"] == driver.pid    # stale file, no lock:
        assert lock.holder(exp) is None
        rc, out, err = cli(*args, "--resume", "--address", ray_session)
        assert rc == 0, err[-3000:]
        assert len(pd.read_csv(exp / "trials.csv")) == 3
    finally:
        if driver.poll() is None:
            driver.kill()
        for p in left:                                          # only what this test's driver started
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
