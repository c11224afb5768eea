"""A finished (or interrupted) Tune run read back as tables: one row per trial (trials.csv, with its
status in words) and one row per trial x round (history.csv). Reads a ResultGrid; starts nothing."""
from __future__ import annotations

from pathlib import Path

from ..core.trial import candidate_values, status_of, trial_number


def last_line(error: BaseException | None) -> str:
    """The useful line of a (Ray-wrapped) exception: its last non-empty line."""
    if error is None:
        return ""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]


def max_rounds(config: dict) -> int:
    """Rounds of a trial that runs its whole budget (a cross-validation trial: its candidate's)."""
    cfg = candidate_values(config)
    return int(cfg.get("epochs") or 0) * int(cfg.get("evals_per_epoch") or 1)


def trial_rows(results, searched: list[str]) -> tuple[list[dict], list[dict]]:
    """(one row per trial, one row per trial x round) from a ResultGrid.

    status: core.trial.Status (completed | stopped | early_stopped | diverged | oom | error | not_run)
    start, end: ISO 8601 times of the trial's start (its first attempt) and of its last report
    gpu_ids: the GPU ids Ray assigned to it ("" without GPUs), cuda_visible_devices: what Ray set from
    them in the trial's process; device: what it actually trained on
    """
    import pandas as pd

    rows, history = [], []
    for result in results:
        cfg = result.config or {}
        df = result.metrics_dataframe if result.metrics_dataframe is not None else pd.DataFrame()
        if "training_iteration" in df:
            # After a --resume, Tune re-runs the rounds a trial reported after its last snapshot of the
            # experiment and appends them to progress.csv again: keep the run that led to the result.
            df = df.drop_duplicates("training_iteration", keep="last").sort_values("training_iteration")
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path or "?").name
        rounds = int(metrics.get("training_iteration") or 0)
        status = status_of(reported=metrics.get("status"), rounds=rounds, max_rounds=max_rounds(cfg),
                           error=result.error is not None).value
        vals = df["val_acc"].dropna() if "val_acc" in df else pd.Series(dtype=float)
        row = {"trial": trial_number(result.path), "trial_id": trial_id, "status": status}
        row.update({k: cfg.get(k) for k in searched if k in cfg})
        row.update({"best_val_acc": float(vals.max()) if len(vals) else None,
                    "last_val_acc": float(vals.iloc[-1]) if len(vals) else None,
                    "last_val_loss": metrics.get("val_loss"),
                    "epochs": metrics.get("epoch", 0.0) if status != "error" else (
                        float(df["epoch"].iloc[-1]) if "epoch" in df and len(df) else 0.0),
                    "rounds": rounds, "seconds": round(float(metrics.get("time_total_s") or 0.0), 2),
                    "node": metrics.get("node") or metrics.get("node_ip", ""),
                    "start": metrics.get("started_at", ""), "end": metrics.get("reported_at", ""),
                    "gpu_ids": metrics.get("gpu_ids", ""),
                    "cuda_visible_devices": metrics.get("cuda_visible_devices", ""),
                    "device": metrics.get("device_used", ""),
                    "precision_used": metrics.get("precision_used", ""),
                    "error": metrics.get("error") or last_line(result.error),
                    "path": result.path})
        rows.append(row)
        keep = [c for c in ("training_iteration", "round", "epoch", "train_loss", "train_acc", "val_loss",
                            "val_acc", "lr", "seconds", "images_per_s", "precision_used", "time_total_s",
                            "node_ip")
                if c in df.columns]
        for rec in df[keep].to_dict("records"):
            history.append({"trial_id": trial_id, **rec})
    rows.sort(key=lambda r: (r["trial"] is None, r["trial"] or 0))
    return rows, history
