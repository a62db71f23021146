"""MkDocs hook: the course (notebooks/*.ipynb) and the API reference (one page per module),
found by glob at build time, so a new notebook or module joins the site and its navigation
without an edit to mkdocs.yml.

* ``notebooks/NN_topic.ipynb`` becomes the page ``notebooks/NN_topic/``, rendered (not
  executed) by mkdocs-jupyter; its title in the navigation is the notebook's first heading.
  The file is read in place (its ``src_dir`` is the repository root), so there is no copy
  and no symlink to keep in step.
* ``tinygemma/<module>.py`` becomes ``reference/<module>.md`` holding ``::: tinygemma.<module>``
  for mkdocstrings.

mkdocs.yml names the two sections with a placeholder each (``course/`` and ``reference/``);
this hook fills them (the course after its introduction, ``docs/course.md``).

It also bundles the two renderers the pages need, installed from npm by ``npm ci``
(``package.json`` pins them), so that equations and diagrams render offline and no page loads
anything from a CDN: MathJax, copied into the site as ``assets/mathjax/`` and configured by
``docs/javascripts/mathjax.js``; and Mermaid (its one-file build ``@mermaid-js/tiny``), copied
as ``assets/mermaid/`` and loaded by the pages that hold a diagram, before the theme's script,
which uses a ``mermaid`` already defined instead of fetching one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File
from mkdocs.utils import get_relative_url

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
PACKAGE = ROOT / "tinygemma"
SKIP_MODULES = {"__main__"}
MATHJAX = ROOT / "node_modules" / "mathjax" / "es5"
# The one-file build with every TeX extension (none is fetched on demand), and the fonts it
# loads from beside itself.
MATHJAX_FILES = ["tex-chtml-full.js", "output/chtml/fonts/woff-v2/*.woff"]
MERMAID = ROOT / "node_modules" / "@mermaid-js" / "tiny" / "dist" / "mermaid.tiny.js"
MERMAID_URL = "assets/mermaid/mermaid.tiny.js"


def notebooks() -> list[Path]:
    return sorted(p for p in NOTEBOOKS.glob("[0-9]*.ipynb"))


def notebook_title(path: Path) -> str:
    """The first Markdown heading of a notebook, without its '#'s (else the file name)."""
    try:
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        for cell in cells:
            if cell.get("cell_type") == "markdown":
                for line in "".join(cell.get("source", "")).splitlines():
                    if line.startswith("#"):
                        return _plain(line.lstrip("#").strip())
    except (OSError, ValueError, KeyError):
        pass
    return path.stem


def _plain(title: str) -> str:
    """A heading with its LaTeX made plain for the navigation: $\\sqrt{D}$ -> √D."""
    title = re.sub(r"\\sqrt\{(\w+)\}", r"√\1", title)
    return title.replace("$", "")


def modules() -> list[str]:
    """Dotted names of the package's modules: tinygemma.x and tinygemma.checkpoints.y."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] in SKIP_MODULES or "__pycache__" in parts:
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return names


def reference_page(module: str) -> str:
    return f"reference/{module.removeprefix('tinygemma').lstrip('.') or 'tinygemma'}.md"


def on_config(config):
    """Fill the nav placeholders 'course/' and 'reference/' with the pages found."""
    course = [{notebook_title(p): f"notebooks/{p.name}"} for p in notebooks()]
    reference = [{m: reference_page(m)} for m in modules()]
    config["nav"] = [_fill(item, course, reference) for item in config["nav"]]
    return config


def _fill(item, course, reference):
    if isinstance(item, dict):
        (title, value), = item.items()
        if value == "course/":  # the introduction first, then the chapters
            return {title: ["course.md", *course]}
        if value == "reference/":
            return {title: reference}
        if isinstance(value, list):
            return {title: [_fill(v, course, reference) for v in value]}
    return item


@event_priority(100)  # before mkdocs-jupyter's on_files, which turns .ipynb files into pages
def on_files(files, config):
    for p in notebooks():  # a real file (mkdocs-jupyter reads it by its abs_src_path)
        files.append(File(f"notebooks/{p.name}", src_dir=str(ROOT), dest_dir=config["site_dir"],
                          use_directory_urls=config["use_directory_urls"]))
    for m in modules():
        title = m
        files.append(File.generated(config, reference_page(m),
                                    content=f"# `{title}`\n\n::: {m}\n"))
    for path in mathjax_files():
        files.append(File.generated(config, f"assets/mathjax/{path.relative_to(MATHJAX).as_posix()}",
                                    abs_src_path=str(path)))
    files.append(File.generated(config, MERMAID_URL, abs_src_path=str(installed(MERMAID))))
    return files


def on_page_content(html, page, config, files):
    """Pages with a diagram load the bundled Mermaid ahead of the theme's script."""
    if 'class="mermaid"' not in html:
        return html
    return f'<script src="{get_relative_url(MERMAID_URL, page.url)}"></script>\n{html}'


def mathjax_files() -> list[Path]:
    """The MathJax files the site serves, from the npm package."""
    found = [p for pattern in MATHJAX_FILES for p in sorted(MATHJAX.glob(pattern))]
    installed(MATHJAX / MATHJAX_FILES[0])
    return found


def installed(path: Path) -> Path:
    """``path`` of an npm package, or an error that says how to install it."""
    if not path.is_file():
        raise PluginError(f"{path.relative_to(ROOT)} is missing: run `npm ci` in the repository's "
                          "root first (package.json pins the docs' renderers)")
    return path
