"""An explorer renders and answers in a real JupyterLab, in a real browser.

Not in the default test run (pyproject's ``addopts`` ignores this folder); CI runs it after
installing Chromium (``.ci/run``)::

    pytest -q tests/browser

JupyterLab is started on 127.0.0.1 (a free port, a random token, its settings, workspaces and
runtime files in a temporary folder) on a one-cell notebook holding ``explore.layers``. Headless
Chromium (Debian's, driven by Playwright) opens it and runs it. The widget must render as a
widget (not the static picture a page without a kernel shows, not "Error displaying widget"),
then moving the step slider with the keyboard must redraw the panels. ``CHROMIUM`` names another
browser binary.
"""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from chromium import browser  # noqa: F401 - the fixture

ROOT = Path(__file__).resolve().parents[2]
CELL = """import tinygemma as tg
from tinygemma import explore

model = tg.load_demo(fast=False)
ex = explore.layers(model, "The capital of France is")
ex"""
MINUTE = 60_000  # Playwright timeouts are in milliseconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on a folder holding ``explorer.ipynb``: its URL (token included)."""
    home = tmp_path_factory.mktemp("lab")
    nb = {"cells": [{"cell_type": "code", "execution_count": None, "metadata": {},
                     "outputs": [], "source": CELL, "id": "explorer"}],
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                      "language": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    (home / "explorer.ipynb").write_text(json.dumps(nb))
    port, token = free_port(), secrets.token_hex(16)
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               JUPYTER_RUNTIME_DIR=str(home / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(home / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"))
    log = open(home / "lab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={home}",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail("JupyterLab did not start:\n" + (home / "lab.log").read_text())
                time.sleep(0.5)
        yield f"{url}/lab/tree/explorer.ipynb?token={token}", home
    finally:
        server.send_signal(signal.SIGTERM)  # the server shuts its kernels down, then exits
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)  # the server's own session: it and its kernels
            server.wait()
        log.close()




def test_the_layers_explorer_renders_and_its_slider_redraws_the_panels(lab, browser):
    url, home = lab
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(2 * MINUTE)
    try:
        run_and_move_the_slider(page, url)
    except Exception:
        page.screenshot(path=str(home / "failure.png"))
        log = (home / "lab.log").read_text()[-3000:]
        raise AssertionError(f"see {home / 'failure.png'}; the end of JupyterLab's log:\n{log}")
    finally:
        page.close()


def run_and_move_the_slider(page, url):
    page.goto(url)
    page.locator(".jp-Notebook .jp-Cell").first.wait_for()
    # Run only once the kernel is up: asked earlier, JupyterLab may ask which kernel to start
    page.get_by_text("Python 3 (ipykernel) | Idle").wait_for(timeout=5 * MINUTE)
    page.get_by_text("Run", exact=True).first.click()  # the menu bar
    page.get_by_text("Run All Cells", exact=True).click()
    select = page.locator(".jp-Dialog").get_by_role("button", name="Select")
    try:
        select.wait_for(timeout=3000)
        select.click()  # the kernel the notebook names
    except PlaywrightTimeout:
        pass  # no dialog: the usual case

    output = page.locator(".jp-Cell .jp-OutputArea-output")
    slider = output.locator(".widget-slider")
    slider.wait_for(timeout=8 * MINUTE)  # the kernel starts, loads the demo, runs the pass
    assert output.locator(".jp-RenderedImage").count() == 0  # the widget, not its picture
    assert "Error displaying widget" not in output.inner_text()

    readout = output.locator(".widget-readout").first
    value_panel = output.locator(".widget-image").first  # the current intermediate
    page.wait_for_function("img => img.complete && img.naturalWidth > 0",
                           arg=value_panel.element_handle())
    assert readout.inner_text().strip() == "embed"
    before = value_panel.get_attribute("src")

    slider.locator(".noUi-handle").first.focus()
    page.keyboard.press("ArrowRight")  # one step: the pre-attention norm of layer 0
    page.wait_for_function("el => el.textContent.trim() === 'layers.0.attn_norm'",
                           arg=readout.element_handle())
    page.wait_for_function("([img, old]) => img.src !== old && img.complete",
                           arg=[value_panel.element_handle(), before])
    assert "layers.0.attn_norm" in output.locator(".widget-htmlmath").first.inner_text()
