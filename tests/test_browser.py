"""What a user sees in a real browser (headless Chromium driven by Selenium): the Ray dashboard of a
running search, past its token authentication, listing the search's trial actors; optuna-dashboard
started by `tune_cifar dashboard EXP` listing the study's trials; the finished search's report.html
with every image rendered. Chromium and chromedriver are required (`.ci/run` installs Debian's):
a missing browser fails these tests, never skips them."""
from __future__ import annotations

import base64
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY

pytestmark = pytest.mark.slow          # end-to-end runs: `pytest -m 'not slow'` leaves them out

CHROMIUM = os.environ.get("TUNE_CIFAR_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("TUNE_CIFAR_CHROMEDRIVER", "/usr/bin/chromedriver")
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1400,1000")
EXP = "b"
# Tune runs the function trainable `run_trial` as actors of this class, shown with repr run_trial
# (ray/tune/trainable/function_trainable.py: wrap_function)
TRIAL_ACTOR_CLASS = "ImplicitFunc"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Command:
    """A `python -m tune_cifar ...` subprocess whose output lines are collected by a thread."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "tune_cifar", *map(str, args)], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.lines: list[str] = []
        self._new: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            self._new.put(line)

    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """The first output line matching pattern (already seen or coming within timeout)."""
        deadline = time.monotonic() + timeout
        for line in list(self.lines):
            if m := re.search(pattern, line):
                return m
        while time.monotonic() < deadline:
            try:
                line = self._new.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None and self._new.empty():
                    break
                continue
            if m := re.search(pattern, line):
                return m
        pytest.fail(f"no line matching {pattern!r} (exit status {self.proc.poll()}):\n{self.output()[-3000:]}")

    def stop(self) -> None:
        """Ctrl-C (the driver then stops the Ray it started), TERM if ignored, KILL as a last resort."""
        for sig, wait in ((signal.SIGINT, 45), (signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            if self.proc.poll() is not None:
                return
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def search(cifar_dir, tmp_path_factory):
    """`search ... --dashboard` running in a subprocess (started, not waited for)."""
    results = tmp_path_factory.mktemp("results")
    # 10 trials of up to 3 epochs keep Ray (and its dashboard) up long enough for the browser to log in
    # and find the trials on a fast machine; the budget bounds it on a slow one
    cmd = Command("search", TINY, "--data-dir", cifar_dir, "--subset", "3000", "--num-samples", "10",
                  "--max-epochs", "3", "--time-budget", "150", "--dashboard", "--dashboard-port", free_port(),
                  "--results-dir", results, "--name", EXP)
    cmd.exp = results / EXP
    cmd.results = results
    try:
        yield cmd
    finally:
        cmd.stop()


@pytest.fixture(scope="module")
def chrome(tmp_path_factory):
    """A fresh headless Chromium (its own profile); fails when the browser or its driver is missing."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not (Path(p).is_file() and os.access(p, os.X_OK))]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: install them (Debian: apt-get install -y chromium "
                    "chromium-driver), as .ci/run does")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def body_text(driver) -> str:
    from selenium.common.exceptions import WebDriverException
    try:
        return driver.execute_script("return document.body ? document.body.innerText : ''") or ""
    except WebDriverException:
        return ""


def wait_until(driver, check, timeout: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; page {driver.current_url} shows:\n"
                f"{body_text(driver)[:1500]}")


def screenshot(driver, path: Path, full_page: bool = False) -> Path:
    """Save a PNG of the page and check it is not blank (not one colour)."""
    from PIL import Image
    if full_page:
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        path.write_bytes(base64.b64decode(shot["data"]))
    else:
        driver.save_screenshot(str(path))
    assert path.stat().st_size > 5_000, f"{path}: {path.stat().st_size} bytes"
    with Image.open(path) as img:
        colours = img.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 20, f"{path} is blank ({len(colours)} colours)"
    print(f"screenshot: {path}")
    return path


def test_ray_dashboard_lists_trial_actors(search, chrome, shots):
    """The URL and login step `--dashboard` prints get a browser past Ray's token authentication to
    the Actors view, which lists the search's trial actors while the search runs."""
    url = search.wait_for(r"Ray dashboard: (http://\S+)", timeout=120).group(1)
    assert url.startswith("http://127.0.0.1:"), url
    token = search.wait_for(r"\"Authentication Token Required\" box.*: (\S+)\s*$", timeout=5).group(1)
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    def login_box():
        if "Ray Dashboard" not in chrome.title:    # its HTTP server may still be starting (connection refused)
            try:
                chrome.get(url)
            except WebDriverException:
                pass
            return None
        boxes = chrome.find_elements(By.CSS_SELECTOR, "input[type=password]")
        return boxes[0] if boxes else None

    box = wait_until(chrome, login_box, 60, "the dashboard's \"Authentication Token Required\" box", every=1)
    box.send_keys(token, Keys.ENTER)           # the box POSTs /api/authenticate, which sets the cookie
    wait_until(chrome, lambda: any(c["name"] == "ray-authentication-token" for c in chrome.get_cookies()), 30,
               "the ray-authentication-token cookie")
    actors = url.rstrip("/") + "/#/actors"

    def trial_actors_listed() -> bool:
        # the Actors view does not refresh itself: a trial actor seen while still PENDING_CREATION
        # (no repr yet) shows as such until the page is loaded again
        chrome.get("about:blank")
        chrome.get(actors)
        time.sleep(2)
        return TRIAL_ACTOR_CLASS in body_text(chrome) and "run_trial" in body_text(chrome)
    wait_until(chrome, trial_actors_listed, 90,
               f"the Actors view listing {TRIAL_ACTOR_CLASS} actors of run_trial (the search's trials)", every=1)
    assert "Authentication Token Required" not in body_text(chrome)
    assert search.proc.poll() is None or "test_acc=" in search.output(), search.output()[-3000:]
    screenshot(chrome, shots / "ray_dashboard_actors.png")


def test_optuna_dashboard_lists_the_trials(search, chrome, shots):
    """`dashboard EXP` serves optuna-dashboard on the study while the search runs and after it."""
    import optuna
    deadline = time.monotonic() + 120
    while not (search.exp / "optuna.db").is_file() and time.monotonic() < deadline and search.proc.poll() is None:
        time.sleep(0.5)
    dash = Command("dashboard", EXP, "--results-dir", search.results, "--port", 0)
    try:
        url = dash.wait_for(r"optuna-dashboard of \S+ \(.*\): (http://127\.0\.0\.1:\d+/dashboard\S*)", 60).group(1)
        assert url.endswith("/studies/1"), url
        chrome.get(url + "/trials")
        wait_until(chrome, lambda: "Trial 0" in body_text(chrome), 60, "optuna-dashboard's trial list")
        assert search.wait_for(r"^test_acc=", timeout=240)          # the search has finished
        assert search.proc.wait(timeout=60) == 0, search.output()[-3000:]
        study = optuna.load_study(study_name=EXP, storage=f"sqlite:///{search.exp / 'optuna.db'}")
        numbers = [t.number for t in study.trials]
        import pandas as pd
        assert len(numbers) >= 2 and len(numbers) >= len(pd.read_csv(search.exp / "trials.csv"))
        chrome.refresh()
        wait_until(chrome, lambda: all(f"Trial {n}" in body_text(chrome) for n in numbers), 60,
                   f"optuna-dashboard listing trials {numbers}")
        screenshot(chrome, shots / "optuna_dashboard_trials.png")
    finally:
        dash.stop()
    assert dash.proc.returncode == 0, dash.output()


def test_report_html_renders_every_image(search, chrome, shots):
    """The finished search's report.html, opened from file://, shows every image (embedded)."""
    search.wait_for(r"^test_acc=", timeout=300)
    assert search.proc.wait(timeout=60) == 0, search.output()[-3000:]
    report = search.exp / "report.html"
    expected = (search.exp / "report.md").read_text().count("![")
    chrome.get(report.as_uri())
    images = wait_until(chrome, lambda: chrome.execute_script(
        "const imgs = [...document.images];"
        "return imgs.length && imgs.every(i => i.complete)"
        "  ? imgs.map(i => [i.naturalWidth, i.src.slice(0, 22)]) : null"), 30, "report.html's images")
    assert len(images) == expected >= 5, images
    assert all(w > 0 and src == "data:image/png;base64," for w, src in images), images
    screenshot(chrome, shots / "report_html.png", full_page=True)


def test_token_is_written_nowhere(search):
    """The dashboard token goes to the terminal only: no file of the experiment holds it."""
    token = search.wait_for(r"\"Authentication Token Required\" box.*: (\S+)\s*$", timeout=5).group(1)
    search.wait_for(r"^test_acc=", timeout=300)
    assert search.proc.wait(timeout=60) == 0
    holders = [p for p in search.exp.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]
    assert not holders, holders
