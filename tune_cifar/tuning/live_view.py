"""What a search or kfold shows while it runs, and keeping Ray's own output out of the way.

`LiveView` is a Ray Tune Callback. On a terminal it keeps one table on screen (rich.Live, redrawn at
most every REFRESH_S seconds, cut to the terminal's height): one row per trial with its status, the
searched hyper-parameters, the epoch reached, the last and best validation accuracy and its
seconds, under a header line with trials done / running / pending, the best so far, the elapsed
time and what is left of --time-budget. kfold rows are (configuration, fold) pairs. When stdout
is not a terminal (CI, a log file) it prints one line per finished trial and nothing per round.

Everything is read from Tune's Trial objects at each controller step (status, last_result,
metric_analysis, which Tune also restores on --resume), not from per-event bookkeeping: a trial
that the time budget stops gets no on_trial_complete call (tune_controller.py,
`_stop_experiment_if_needed` -> `_schedule_trial_stop`), and restored trials get none either.

`quiet_ray()` silences what Ray prints on its own unless --verbose (see its docstring).
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.experiment import Trial

from ..core.trial import CANDIDATE, SPLIT, Status, candidate_values, label, status_of, tag_number

REFRESH_S = 2.0
STYLES = {"running": "bold", "completed": "green", "error": "red", "diverged": "red", "oom": "red",
          "pending": "dim", "stopped by ASHA": "dim", "stopped (time budget)": "dim", "not run": "dim"}


def number_of(trial: Trial) -> int:
    """A Tune Trial's n, as in its trial_<n>_<id> folder (tuners.trial_dirname; core.trial.trial_number)."""
    return tag_number(trial.experiment_tag)


def hyper_parameters(trial: Trial, keys: list[str]) -> dict[str, Any]:
    """The trial's values of the searched keys; a kfold trial's are those of its configuration."""
    cfg = candidate_values(trial.config)
    return {k: cfg.get(k) for k in keys}


def max_rounds(trial: Trial) -> int:
    """Rounds of a trial that runs to its end: every trial config holds epochs and evals_per_epoch."""
    cfg = candidate_values(trial.config)
    return int(cfg.get("epochs") or 0) * int(cfg.get("evals_per_epoch") or 1)


def last_result(trial: Trial) -> dict[str, Any]:
    # not trial.last_result: for a trial that never reported, that property waits on its actor
    return trial.last_result if trial.has_reported_at_least_once else {}


def trial_status(trial: Trial, ended_by_clock: bool = False, ending: bool = False) -> str:
    """The live view's word for a trial: core.trial's status (its `label`), or pending / running.

    A TERMINATED trial that did not end by its own rule and ran fewer than its max rounds was stopped
    from outside: by ASHA, or by the time budget when that had run out (trials.csv: 'stopped').
    ending: called from on_trial_complete, where Tune has not yet marked the trial TERMINATED."""
    if trial.status in (Trial.PENDING, Trial.PAUSED) and not ending:
        return trial.status.lower()
    last = last_result(trial)
    if trial.status == Trial.RUNNING and not ending and last.get("status") in (None, Status.RUNNING.value):
        return Status.RUNNING.value
    status = status_of(reported=last.get("status"), rounds=int(last.get("training_iteration") or 0),
                       max_rounds=max_rounds(trial), error=trial.status == Trial.ERROR)
    return label(status, ended_by_clock)


def error_line(trial: Trial) -> str:
    """The last line of the trial's error.txt (the exception), for the one-line report."""
    try:
        lines = [ln.strip() for ln in Path(trial.error_file).read_text().splitlines() if ln.strip()]
        return lines[-1][:200]
    except (OSError, TypeError, IndexError, AttributeError):   # no error file (yet)
        return ""


def accuracy(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


class LiveView(Callback):
    """The live table (terminal) or one line per finished trial (anything else); see the module doc."""

    def __init__(self, name: str, kind: str, params: list[str], started: float, time_budget: float | None,
                 live: bool, deadline: float | None = None, console=None):
        self.name, self.kind, self.params = name, kind, params
        self.started, self.time_budget = started, time_budget
        self.deadline = deadline            # when the Tuner's own time_budget_s runs out (None: no budget)
        self.live = live
        self.console = console
        self._live = None
        self._drawn = 0.0
        self._ended: dict[str, str] = {}    # trial_id -> status, fixed when first seen finished
        self._total = 0

    # --- Tune's hooks ---------------------------------------------------------------------------
    def setup(self, total_num_samples: int | None = None, **info):
        self._total = total_num_samples or 0

    def on_step_end(self, iteration: int, trials: list[Trial], **info):
        self._note_endings(trials)
        if self.live and time.time() - self._drawn >= REFRESH_S:
            self._draw(trials)

    def on_experiment_end(self, trials: list[Trial], **info):
        self._note_endings(trials)
        if self.live:
            self._draw(trials)
        else:
            print(self.header(trials), flush=True)
        self.close()

    def close(self) -> None:
        """Stop the live display (the last table stays on screen); safe to call twice."""
        if self._live is not None:
            self._live.stop()
            self._live = None

    # --- state ------------------------------------------------------------------------------------
    def status(self, trial: Trial) -> str:
        return self._ended.get(trial.trial_id) or trial_status(trial)

    def _note_endings(self, trials: list[Trial]) -> None:
        clock_out = self.deadline is not None and time.time() >= self.deadline - 1.0
        for t in trials:
            if t.status in (Trial.TERMINATED, Trial.ERROR) and t.trial_id not in self._ended:
                self._ended[t.trial_id] = trial_status(t, ended_by_clock=clock_out)
                if not self.live:
                    print(self.line(t), flush=True)

    def best(self, trials: list[Trial]) -> str:
        """search: the trial with the highest last val_acc (how best.json ranks); kfold: the
        configuration with the highest mean over its finished folds."""
        if self.kind == "kfold":
            folds: dict[int, list[float]] = {}
            for t in trials:
                if self.status(t) == "completed" and last_result(t).get("val_acc") is not None:
                    folds.setdefault(t.config[CANDIDATE], []).append(last_result(t)["val_acc"])
            if not folds:
                return ""
            c, accs = max(folds.items(), key=lambda kv: sum(kv[1]) / len(kv[1]))
            return (f"best config {c}: mean val_acc {sum(accs) / len(accs):.4f} over {len(accs)} "
                    f"fold{'s' if len(accs) > 1 else ''}")
        scored = [(last_result(t).get("val_acc"), t) for t in trials if self.status(t) not in ("error", "pending")]
        scored = [(v, t) for v, t in scored if v is not None]
        if not scored:
            return ""
        v, t = max(scored, key=lambda vt: vt[0])
        return f"best val_acc {v:.4f} (trial {number_of(t)})"

    def header(self, trials: list[Trial]) -> str:
        statuses = [self.status(t) for t in trials]
        done = sum(s not in ("running", "pending", "paused") for s in statuses)
        running, pending = statuses.count("running"), statuses.count("pending")
        of = f" of {self._total}" if 0 < self._total < 10**6 and self.time_budget is None else ""
        elapsed = time.time() - self.started
        parts = [f"{self.kind} {self.name}: {done}{of} done, {running} running, {pending} pending",
                 self.best(trials), f"{clock(elapsed)} elapsed"]
        if self.time_budget:
            parts.append(f"{clock(max(0.0, self.time_budget - elapsed))} left of {clock(self.time_budget)}")
        return " | ".join(p for p in parts if p)

    def cells(self, t: Trial) -> list[str]:
        last, acc = last_result(t), t.metric_analysis.get("val_acc", {})
        who = ([str(t.config[CANDIDATE]), str(t.config[SPLIT])] if self.kind == "kfold"
               else [str(number_of(t))])
        epochs = t.config.get("epochs")
        return [*who, self.status(t), *(fmt(v) for v in hyper_parameters(t, self.params).values()),
                f"{fmt(last['epoch'])}/{epochs}" if last.get("epoch") is not None else "-",
                accuracy(last.get("val_acc")), accuracy(acc.get("max")),
                f"{last['time_total_s']:.0f}s" if last.get("time_total_s") is not None else "-"]

    def line(self, t: Trial) -> str:
        """One finished trial in words, for logs: 'trial 3  stopped by ASHA  lr=0.07 ...'."""
        c = self.cells(t)
        who = f"config {c[0]} fold {c[1]}" if self.kind == "kfold" else f"trial {c[0]}"
        rest = c[2 if self.kind == "kfold" else 1:]
        params = " ".join(f"{k}={v}" for k, v in zip(self.params, rest[1:]))
        epoch, last, best, secs = rest[-4:]
        text = f"{who}  {rest[0]}  {params}  epoch {epoch}  val_acc {last} (best {best})  {secs}"
        if rest[0] == "error":
            text += f"  {error_line(t)}"
        return text

    # --- drawing ----------------------------------------------------------------------------------
    def table(self, trials: list[Trial]):
        from rich import box
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        # no borders and one space between columns: 80 columns hold the table of a 3-key space;
        # on a narrower terminal the hyper-parameter columns give way, the status never wraps
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1), collapse_padding=True)
        for col in (["config", "fold"] if self.kind == "kfold" else ["#"]):
            table.add_column(col, justify="right", no_wrap=True)
        table.add_column("status", no_wrap=True)
        for p in self.params:
            table.add_column(p, justify="right", overflow="ellipsis")
        for col in ("epoch", "val_acc", "best", "time"):
            table.add_column(col, justify="right", no_wrap=True)
        shown = self.fit_rows(trials)
        for t in shown:
            table.add_row(*self.cells(t), style=STYLES.get(self.status(t)))
        parts = [Text(self.header(trials), style="bold"), table]
        if len(shown) < len(trials):
            parts.append(Text(f"{len(trials) - len(shown)} more trials not shown (trials.csv lists all at the end)"))
        return Group(*parts)

    def fit_rows(self, trials: list[Trial]) -> list[Trial]:
        """The rows that fit the terminal: the running trials, then the best finished, then pending."""
        room = max(5, (self.console.height if self.console else 24) - 7)
        if len(trials) <= room:
            return sorted(trials, key=number_of)
        rank = {"running": 0, "pending": 2, "paused": 2}
        keyed = sorted(trials, key=lambda t: (rank.get(self.status(t), 1),
                                              -(last_result(t).get("val_acc") or 0.0), number_of(t)))
        return sorted(keyed[:room], key=number_of)

    def _draw(self, trials: list[Trial]) -> None:
        from rich.live import Live
        if self._live is None:
            # redirect_stdout/stderr: anything printed meanwhile appears above the table, not through it
            self._live = Live(console=self.console, auto_refresh=False, transient=False)
            self._live.start()
        self._live.update(self.table(trials), refresh=True)
        self._drawn = time.time()


def clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class _DropTrialErrors(logging.Filter):
    """Tune logs every failed attempt of a trial with its whole traceback ("Trial task failed for
    trial ...") and lists unfinished trials at the end; the view reports both in one line each, and
    the traceback stays in the trial's error.txt."""
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Trial task failed", "Trials did not complete"))


@contextmanager
def quiet_ray(verbose: bool):
    """Ray's own output, off for the time of a run unless --verbose (levels and variables restored after).

    * Tune's output engine: RAY_AIR_NEW_OUTPUT=0 selects the old engine and RunConfig(verbose=0)
      silences it (runner.py). verbose=0 alone is not enough in Ray 2.60: the new engine's
      TuneTerminalReporter prints its "Configuration for experiment" box and every trial error
      whatever the verbosity (tune/experimental/output.py, experiment_started / on_trial_error).
    * Driver-side warnings (Ray's token-auth notice at start-up, Tune's "Experiment state snapshotting
      has been triggered multiple times" per round, MLflow's and Optuna's INFO lines): their loggers
      at ERROR / WARNING.
    * Worker output (per round "Checkpoint successfully created at ..." of ray.train's logger, and
      the "(autoscaler) Tip: use `ray status`" lines) reaches the driver only through
      ray.init(log_to_driver=True); it always goes to /tmp/ray/session_latest/logs/worker-*.out|err.
      ray_session.start_ray decides that flag; runner.py quiets the trainable's logger instead.
    """
    if verbose:
        yield
        return
    import optuna

    env = {"RAY_AIR_NEW_OUTPUT": "0"}
    saved_env = {k: os.environ.get(k) for k in env}
    levels = {"ray.tune": logging.ERROR, "ray.train": logging.ERROR, "ray.air": logging.ERROR,
              "ray._private": logging.ERROR, "mlflow": logging.WARNING, "alembic": logging.WARNING}
    saved_levels = {name: logging.getLogger(name).level for name in levels}
    drop = _DropTrialErrors()
    chatty = [logging.getLogger(n) for n in ("ray.tune.execution.tune_controller", "ray.tune.tune")]
    optuna_level = optuna.logging.get_verbosity()
    os.environ.update(env)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    for lg in chatty:
        lg.addFilter(drop)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        for k, v in saved_env.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)
        for lg in chatty:
            lg.removeFilter(drop)
        optuna.logging.set_verbosity(optuna_level)
