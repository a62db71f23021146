"""The course chapters 00-06 and 13 are committed executed, small, and clean.

nbmake executes the notebooks (``pytest --nbmake notebooks/``); these fast checks read the
committed files only, so that a chapter pushed without its outputs, with an error in an
output, or with a figure that bloats it is caught by the ordinary test run.
"""

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CHAPTERS = ["00_overview", "01_tokenizer", "02_embeddings", "03_rmsnorm", "04_rope",
            "05_attention_mha_vs_mqa", "06_geglu", "13_loss"]


@pytest.fixture(params=CHAPTERS)
def chapter(request):
    path = NOTEBOOKS / f"{request.param}.ipynb"
    return path, json.loads(path.read_text(encoding="utf-8"))


def test_committed_executed_in_order_without_errors(chapter):
    path, nb = chapter
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    counts = [c.get("execution_count") for c in code]
    assert counts == list(range(1, len(code) + 1)), f"{path.name}: not executed top to bottom"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: an output is an error: {errors[0].get('ename')}"
    assert any("image/png" in o.get("data", {}) for c in code for o in c.get("outputs", [])), \
        f"{path.name}: no figure"


def test_small_and_free_of_machine_paths(chapter):
    path, nb = chapter
    assert path.stat().st_size < 1_000_000, f"{path.name}: {path.stat().st_size} bytes"
    text = json.dumps([c.get("outputs", []) for c in nb["cells"]])
    assert not re.search(r"/(root|home|work|tmp)/", text), f"{path.name}: a local path in an output"


def test_has_checks_exercises_and_solutions(chapter):
    path, nb = chapter
    source = "\n".join("".join(c["source"]) for c in nb["cells"])
    assert "assert" in source, f"{path.name}: no check cell"
    assert "## Exercises" in source
    solutions = NOTEBOOKS / "solutions" / f"{path.stem}_solutions.py"
    assert solutions.exists() and solutions.name in source, f"{path.name}: solutions not linked"
    hidden = [c for c in nb["cells"] if c["cell_type"] == "code"
              and c.get("metadata", {}).get("jupyter", {}).get("source_hidden")]
    assert any(solutions.name in "".join(c["source"]) for c in hidden), \
        f"{path.name}: the solutions are not run by a hidden cell"
