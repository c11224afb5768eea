"""Stopping a run from outside without losing it: SIGTERM (what `ray job stop`, systemd, Slurm and
`kill` send) and SIGINT (Ctrl-C) end Ray Tune's loop the way Tune's own stop request does.

Tune's stop request (tune.run's handler of SIGUSR1, and of SIGINT unless TUNE_DISABLE_SIGINT_HANDLER)
ends the loop, saves the experiment state one last time with every trial's latest checkpoint, stops
the trials and returns a ResultGrid, as if the run had finished. So here:
  - during `Tuner.fit`, SIGTERM and SIGINT call that stop request (Tune's SIGINT handler is switched
    off so that both signals come here) and remember that a stop was asked for;
  - when fit returns after a stop, `Stopped` (a KeyboardInterrupt) is raised instead of the results:
    the command writes no trials.csv / best.json and never tests the unfinished search; `--resume`
    continues it from the saved state, each finished trial kept, each running one from its last round;
  - a second signal stops at once (KeyboardInterrupt), as a second Ctrl-C does in Tune;
  - outside fit (start-up, the final test, the report, the retrain of --cv-top) SIGTERM is a
    KeyboardInterrupt (cli.py): the command ends at once and --resume continues where it was.

`ray job stop` sends SIGTERM to the driver and its children, waits RAY_JOB_STOP_WAIT_TIME_S (default 3 s,
read by the job's supervisor, so set it in the job's runtime_env env_vars) and then sends SIGKILL; a
stop cut short by SIGKILL is the kill -9 case, which --resume handles as well (README).
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """A run stopped by a signal after Tune saved its state: continue it with --resume."""


def fit_until_stopped(tuner) -> Any:
    """`tuner.fit()`, ended cleanly by SIGTERM / SIGINT (see the module): raises Stopped then."""
    if threading.current_thread() is not threading.main_thread():
        return tuner.fit()                   # signal handlers can only be set in the main thread
    asked: list[int] = []

    def stop(signum: int, frame) -> None:
        tune_stop = signal.getsignal(signal.SIGUSR1)     # tune.run's stop request, installed by fit
        if asked or not callable(tune_stop):
            raise KeyboardInterrupt          # a second signal, or fit not yet in its loop: stop now
        asked.append(signum)
        print(f"\n{signal.Signals(signum).name}: stopping the trials and saving Tune's state; "
              "continue with the same command and --resume", flush=True)
        tune_stop(signal.SIGUSR1, frame)

    with _env("TUNE_DISABLE_SIGINT_HANDLER", "1"), _handlers(stop):
        results = tuner.fit()
    if asked:
        raise Stopped()
    return results


@contextlib.contextmanager
def _handlers(handler) -> Iterator[None]:
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    before_usr1 = signal.getsignal(signal.SIGUSR1)
    for s in STOP_SIGNALS:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)
        signal.signal(signal.SIGUSR1, before_usr1)     # Tune's handler would set a finished run's event


@contextlib.contextmanager
def _env(key: str, value: str) -> Iterator[None]:
    before = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """For a whole command: SIGTERM raises KeyboardInterrupt, as Ctrl-C does, so a stopped command
    ends through the same path (cleanup, "continue with --resume") instead of dying mid-step."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.getsignal(signal.SIGTERM)

    def interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)
