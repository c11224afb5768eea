"""The Ray session of a command: what this machine or cluster offers, and starting / joining Ray.

Ray is imported inside functions only, so `--help` and input validation stay fast and nothing of
Ray starts before the input has been checked.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any

from ..core.config import UserError

EXPOSED_DASHBOARD_WARNING = (
    "warning: the Ray dashboard on {host} is reachable from the network: anyone who reaches it can "
    "run code on this machine (CVE-2023-48022, 'ShadowRay'); prefer 127.0.0.1 and an SSH tunnel")


@dataclass
class RayOptions:
    address: str | None = None          # None: start an embedded local Ray; 'auto' or HOST:PORT: join
    dashboard: bool = False
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = 8265
    storage: str | None = None          # where Tune writes; None = the experiment folder
    verbose: bool = False               # forward the workers' output to this terminal
    num_cpus: int | None = None         # CPUs of an embedded Ray (None: Ray counts them); a cluster has its own

    def joins_cluster(self) -> bool:
        return (self.address or os.environ.get("RAY_ADDRESS") or "local") != "local"


def gpus_present() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def trial_resources(gpu: float | None, cpu: float | None, spec_resources, ray_opts: RayOptions) -> dict[str, float]:
    """Per-trial Ray resources. An explicit flag asking for more than exists is an error; the space
    file's defaults are fitted to this machine with a one-line note (they were written for another).
    On a cluster the resources may be on other nodes, so nothing is fitted or refused here."""
    from ..core.spaces import Resources, check_resources
    n_gpus, cores = gpus_present(), os.cpu_count() or 1
    cluster = ray_opts.joins_cluster()
    if gpu is not None and gpu > 0 and not n_gpus and not cluster:
        raise UserError(f"--gpus-per-trial {gpu:g}: no GPU is visible on this machine "
                        "(trials run on the CPU without the flag)")
    if gpu is not None:
        check_resources(Resources(gpu=gpu, cpu=1.0), "--gpus-per-trial: ", gpus_present=None if cluster else n_gpus)
    if cpu is not None:
        check_resources(Resources(gpu=1.0, cpu=cpu), "--cpus-per-trial: ")
        if cpu > cores and not cluster:
            raise UserError(f"--cpus-per-trial {cpu:g} is more than the {cores} CPU cores present")
    want_gpu = spec_resources.gpu if gpu is None else gpu
    want_cpu = spec_resources.cpu if cpu is None else cpu
    if not cluster:
        if cpu is None and want_cpu > cores:
            print(f"note: resources.cpu={want_cpu:g} of the search space is more than the {cores} CPU cores here: "
                  f"using {cores}", flush=True)
            want_cpu = float(cores)
        if gpu is None and n_gpus and want_gpu > n_gpus:
            print(f"note: resources.gpu={want_gpu:g} of the search space is more than the {n_gpus} GPU(s) here: "
                  f"using {n_gpus}", flush=True)
            want_gpu = float(n_gpus)
    return {"cpu": want_cpu, "gpu": want_gpu if (n_gpus or cluster) else 0}


def threads_for(resources: dict[str, float]) -> int:
    return max(1, int(resources["cpu"]))


def exposed_dashboard_warning(opts: RayOptions) -> str | None:
    if opts.dashboard and opts.dashboard_host not in ("127.0.0.1", "localhost", "::1"):
        return EXPOSED_DASHBOARD_WARNING.format(host=opts.dashboard_host)
    return None


def dashboard_token() -> str | None:
    """The token Ray's token authentication (on by default in Ray 2.60: RAY_AUTH_MODE unset ->
    token; ~/.ray/auth_token, $RAY_AUTH_TOKEN or $RAY_AUTH_TOKEN_PATH) asks of the dashboard, or
    None when authentication is off. The same value `ray get-auth-token` prints."""
    from ray._private.authentication.authentication_utils import is_token_auth_enabled
    from ray._raylet import AuthenticationTokenLoader
    if not is_token_auth_enabled():
        return None
    loader = AuthenticationTokenLoader.instance()
    return loader.get_raw_token(ignore_auth_mode=True) if loader.has_token(ignore_auth_mode=True) else None


def dashboard_login_step() -> str | None:
    """What a browser needs to get past the dashboard's "Authentication Token Required" box, for the
    terminal only (never written to a file: whoever holds the token can run code on the cluster).

    Ray's dashboard takes no token in its URL: the box POSTs it to /api/authenticate, which sets
    an HttpOnly cookie (ray-authentication-token, 30 days) that every later request carries."""
    token = dashboard_token()
    if not token:
        return None
    return (f"  token authentication is on: paste this token into the page's \"Authentication Token Required\" "
            f"box (once per browser; `ray get-auth-token` prints it again): {token}")


def start_ray(opts: RayOptions) -> dict[str, Any]:
    """Join a cluster (--address / RAY_ADDRESS), reuse the Ray this process already runs, or start an
    embedded local Ray; returns its facts ("started": whether stop_ray should shut it down)."""
    import ray

    warning = exposed_dashboard_warning(opts)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")   # CSV + JSON only: experiment.run_config
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    address = opts.address or os.environ.get("RAY_ADDRESS")
    started = not ray.is_initialized()
    # the workers' own output (a line per checkpoint, autoscaler tips) only with --verbose: the live
    # view says what matters, and every worker's log stays in /tmp/ray/session_latest/logs
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": opts.verbose}
    if not started:
        ctx = None
    elif opts.joins_cluster():
        ctx = ray.init(address=address, **kwargs)
    else:
        # address="local": always a new embedded Ray, never one that another process (`ray start`, a
        # test's cluster) has announced in /tmp/ray/ray_current_cluster
        kwargs.update(include_dashboard=opts.dashboard, dashboard_host=opts.dashboard_host,
                      dashboard_port=opts.dashboard_port)
        if opts.num_cpus is not None:     # never when joining: Ray refuses num_cpus for an existing cluster
            kwargs["num_cpus"] = opts.num_cpus
        ctx = ray.init(address="local", **kwargs)
    url = getattr(ctx, "dashboard_url", None)
    if opts.dashboard and url:
        print(f"Ray dashboard: http://{url}", flush=True)
        login = dashboard_login_step()
        if login:
            print(login, flush=True)
    resources = ray.cluster_resources()
    return {"address": address if opts.joins_cluster() else "local", "started": started,
            "dashboard_url": f"http://{url}" if url else None,
            "nodes": len([n for n in ray.nodes() if n.get("Alive")]),
            "cpus": resources.get("CPU", 0), "gpus": resources.get("GPU", 0)}


def stop_ray(facts: dict[str, Any] | None) -> None:
    """Shut down the Ray this command started (not one it joined or found running)."""
    import ray
    if facts is None or facts.get("started"):
        ray.shutdown()
