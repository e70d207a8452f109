"""The inspect report in a real browser: headless Chromium opens index.html from disk.

Every ``<img>`` must have loaded (``naturalWidth > 0``: relative links right, PNGs valid),
and a screenshot is kept under ``test-artifacts/`` (git-ignored) as the test's artefact.
Chromium comes from Debian (``chromium``, ``chromium-driver``); the set-up installs them
when missing and we are root, and skips with the reason only when that is impossible.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from salient.jobs.inspect.config import InspectConfig
from salient.jobs.inspect.driver import run_inspect

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1400,1800",
)


def _install_chromium() -> str | None:
    """Install Chromium + driver from Debian when missing; the reason it cannot, or None."""
    if Path(CHROMIUM).exists() and Path(DRIVER).exists():
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "chromium is not installed and this is not a root Debian system (apt-get)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "chromium", "chromium-driver"],
    ):
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
        if result.returncode != 0:
            return f"`{' '.join(command)}` failed: {result.stderr.strip()[-300:]}"
    return None


@pytest.fixture(scope="module")
def browser():
    reason = _install_chromium()
    if reason:
        pytest.skip(f"cannot run the browser test: {reason}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="salient-chromium-")
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))  # no selenium-manager
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_report_opens_from_disk_and_every_image_loads(browser, demo_data, tmp_path):
    from test_inspect import build_demo_store

    store = build_demo_store(demo_data, tmp_path / "saliency.zarr")
    out = tmp_path / "report"
    ids = (0, 7, 41, 95)
    run_inspect(
        InspectConfig(
            store=store["url"], data=str(demo_data), out=str(out), ids=ids, compare=store["first"]
        )
    )

    browser.get((out / "index.html").as_uri())  # returns after the load event: images done
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, "
        "i.naturalWidth]);"
    )
    assert len(images) == 1 + 2 * len(ids)  # histogram + a panel and a comparison per id
    broken = [src for src, complete, width in images if not complete or width <= 0]
    assert not broken, f"images that did not load: {broken}"
    assert "salient inspect" in browser.title

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "inspect-report.png"
    height = browser.execute_script("return document.body.scrollHeight")
    browser.set_window_size(1400, min(max(height, 800), 6000))
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
