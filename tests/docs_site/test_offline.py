"""The built docs site renders its equations and diagrams offline, in a real browser.

Run after ``mkdocs build`` (CI: ``.ci/run``), not in the default test run (pyproject's
``addopts`` ignores this folder):

    npm ci && mkdocs build --strict && pytest -q tests/docs_site

A chapter page (notebook math, ``$...$`` and ``$$\\begin{aligned}...``) and a Markdown page
(pymdownx.arithmatex) are opened in headless Chromium with every request that leaves
localhost aborted. The equations must be typeset by MathJax (``mjx-container`` elements, no
TeX error), no raw TeX may remain in the text outside code, nothing may be requested from
another host, and every local file asked for (the bundled MathJax and its fonts) must exist.
The architecture page's Mermaid diagrams, likewise offline, must be drawn by the bundled
Mermaid. ``TINYGEMMA_SITE`` names another built site; ``CHROMIUM`` another browser binary.
"""

import functools
import http.server
import os
import re
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from chromium import browser  # noqa: F401 - the fixture

ROOT = Path(__file__).resolve().parents[2]
SITE = Path(os.environ.get("TINYGEMMA_SITE", ROOT / "site"))
RAW_TEX = re.compile(r"\$\$|\\begin\{|\\end\{|\\(sqrt|frac|mathbb|mathrm|top|odot|in)\b|\$[^$\s]")
PAGES = {  # page: (at least this many formulas, at least this many displayed)
    "notebooks/00_overview/": (30, 2),
    "numerics/": (5, 1),
}


@pytest.fixture(scope="module")
def server():
    if not (SITE / "index.html").is_file():
        pytest.fail(f"no built site in {SITE}: run `npm ci && mkdocs build` first")
    handler = functools.partial(Quiet, directory=str(SITE))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass




def offline_page(browser):
    """A new page whose requests to other hosts are aborted: (page, URLs of other hosts asked
    for, local failures), the two lists filled as the page loads."""
    page = browser.new_page()
    outside, failed = [], []

    def route(r):
        if urlsplit(r.request.url).hostname == "127.0.0.1":
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.on("response", lambda resp: resp.status >= 400 and failed.append(f"{resp.status} {resp.url}"))
    return page, outside, failed


def open_offline(browser, url):
    """The page at ``url``, typeset with the network cut off: (page, URLs of other hosts asked
    for, local failures)."""
    page, outside, failed = offline_page(browser)
    page.goto(url, wait_until="load")
    try:  # MathJax replaces the configuration object window.MathJax when it has loaded
        page.wait_for_function("window.MathJax && MathJax.startup && MathJax.startup.promise",
                               timeout=20_000)
        page.evaluate("MathJax.startup.promise")  # resolves once the page is typeset
    except PlaywrightTimeout:
        failed.append("MathJax did not start within 20 s")
    return page, outside, failed


# The text a reader sees outside code and typeset math: innerText leaves out hidden elements.
PROSE = """() => {
  const hide = document.createElement("style");
  hide.textContent = "pre, code, mjx-container { display: none !important; }";
  document.head.appendChild(hide);
  const text = document.querySelector("article").innerText;
  hide.remove();
  return text;
}"""


@pytest.mark.parametrize("path", list(PAGES))
def test_equations_render_offline(server, browser, path):
    page, outside, failed = open_offline(browser, server + path)
    least, least_display = PAGES[path]
    formulas = page.locator("article mjx-container").count()
    displayed = page.locator('article mjx-container[display="true"]').count()
    errors = page.locator("article mjx-merror").count()
    prose = page.evaluate(PROSE)
    page.close()
    assert not outside, f"{path}: requests to other hosts: {outside[:5]}"
    assert not failed, f"{path}: local files missing or MathJax not started: {failed[:5]}"
    assert formulas >= least and displayed >= least_display, \
        f"{path}: {formulas} formulas typeset ({displayed} displayed), expected {least} ({least_display})"
    assert errors == 0, f"{path}: {errors} TeX errors"
    raw = RAW_TEX.search(prose)
    assert raw is None, f"{path}: raw TeX in the text: {prose[max(raw.start() - 60, 0):raw.end() + 60]!r}"


def test_diagrams_render_offline(server, browser):
    page, outside, failed = offline_page(browser)
    page.goto(server + "architecture/", wait_until="load")
    try:  # the theme replaces each <pre class="mermaid"> by a div holding the drawing
        page.wait_for_function('document.querySelectorAll("div.mermaid").length >= 2', timeout=20_000)
    except PlaywrightTimeout:
        failed.append("the diagrams were not drawn within 20 s")
    heights = page.eval_on_selector_all("div.mermaid", "ds => ds.map(d => d.getBoundingClientRect().height)")
    text = page.inner_text("article")
    page.close()
    assert not outside, f"requests to other hosts: {outside[:5]}"
    assert not failed, f"local files missing or diagrams not drawn: {failed[:5]}"
    assert len(heights) >= 2 and min(heights) > 50, f"diagram heights {heights}"
    assert "flowchart" not in text, "a diagram's source is shown as text"
