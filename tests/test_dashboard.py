"""`--dashboard` serves the Ray dashboard over HTTP on 127.0.0.1 while the search runs."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request

from conftest import ROOT, TINY


def test_dashboard_serves_http_on_localhost(cifar_dir, tmp_path):
    port = 8265 + os.getpid() % 500
    proc = subprocess.Popen([sys.executable, "-m", "tune_cifar", "search", TINY, "--dashboard", "--dashboard-port",
                             str(port), "--data-dir", str(cifar_dir), "--subset", "2000", "--num-samples", "4",
                             "--results-dir", str(tmp_path), "--no-report"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url, seen = None, []
    try:
        for line in proc.stdout:
            seen.append(line)
            m = re.search(r"Ray dashboard: (http://\S+)", line)
            if m:
                url = m.group(1)
                break
        assert url and url.startswith("http://127.0.0.1:"), "".join(seen)[-2000:]
        status = None
        for _ in range(60):
            try:
                status = urllib.request.urlopen(url, timeout=5).status
            except urllib.error.HTTPError as e:      # token auth answers 401/403: still its HTTP server
                status = e.code
            except OSError:
                time.sleep(1)
                continue
            break
        assert status in (200, 401, 403), status
    finally:
        proc.stdout.read()
        assert proc.wait(timeout=600) == 0
