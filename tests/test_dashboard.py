"""`--dashboard` serves the Ray dashboard over HTTP on 127.0.0.1 while the search runs, and prints the
token its authentication asks for; `dashboard EXP` refuses bad input in one line (exit 2)."""
from __future__ import annotations

import pytest

import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from conftest import ROOT, TINY, run_cli


def http(url: str, method: str = "GET", headers: dict | None = None):
    """(status, response headers) of one request; HTTP errors are answers too."""
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.headers


@pytest.mark.slow
def test_dashboard_serves_http_on_localhost(cifar_dir, tmp_path):
    port = 8265 + os.getpid() % 500
    proc = subprocess.Popen([sys.executable, "-m", "tune_cifar", "search", TINY, "--dashboard", "--dashboard-port",
                             str(port), "--data-dir", str(cifar_dir), "--subset", "2000", "--num-samples", "4",
                             "--results-dir", str(tmp_path), "--no-report"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url, token, seen = None, None, []
    try:
        for line in proc.stdout:
            seen.append(line)
            if m := re.search(r"Ray dashboard: (http://\S+)", line):
                url = m.group(1)
            if m := re.search(r"\"Authentication Token Required\" box.*: (\S+)\s*$", line):
                token = m.group(1)
                break
        assert url and url.startswith("http://127.0.0.1:"), "".join(seen)[-2000:]
        assert token, "".join(seen)[-2000:]     # Ray's token authentication is on by default
        status = None
        for _ in range(60):
            try:
                status, _ = http(url)
            except OSError:
                time.sleep(1)
                continue
            break
        assert status == 200, status             # the page itself is public; its API asks for the token
        protected = url.rstrip("/") + "/api/version"
        assert http(protected)[0] == 401
        # the login step: the box POSTs the token to /api/authenticate, which sets the session cookie
        status, headers = http(url.rstrip("/") + "/api/authenticate", "POST", {"Authorization": f"Bearer {token}"})
        assert status == 200, status
        cookie = headers.get("Set-Cookie", "").split(";")[0]
        assert cookie == f"ray-authentication-token={token}", headers
        assert http(protected, headers={"Cookie": cookie})[0] == 200
        assert http(protected, headers={"Cookie": "ray-authentication-token=wrong"})[0] == 403
    finally:
        proc.stdout.read()
        assert proc.wait(timeout=600) == 0


def test_dashboard_command_bad_input(tmp_path):
    """No such experiment, a folder without optuna.db (k-fold), a port in use: one line, exit 2."""
    kfold = tmp_path / "kf"
    kfold.mkdir()
    (kfold / "spec.yaml").write_text("command: x\n")
    (kfold / "kfold.csv").write_text("config\n")
    search = tmp_path / "s"
    search.mkdir()
    import optuna
    optuna.create_study(study_name="s", storage=f"sqlite:///{search / 'optuna.db'}", direction="maximize")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for args, words in ((["nope"], "no experiment folder"), (["kf"], "no Optuna study (optuna.db)"),
                            (["s", "--port", str(port)], f"127.0.0.1:{port} is already in use"),
                            (["s", "--port", "70000"], "not a port number")):
            rc, out, err = run_cli("dashboard", *args, "--results-dir", tmp_path, timeout=120)
            assert rc == 2 and words in err and len(err.strip().splitlines()) == 1, (args, rc, out, err)
            assert err.startswith("tune_cifar dashboard: error: "), err
