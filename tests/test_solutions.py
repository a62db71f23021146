"""Every chapter with "your turn" cells also runs solved, so the solutions keep working.

The committed chapters are unsolved (nbmake runs them as they are: each check says "not
written yet"). Here each cell tagged ``your-turn`` is replaced by the solution's definitions of
the functions it stubs (``tinygemma.course.solutions.solved_cell``), and the chapter runs with
``TINYGEMMA_COURSE_STRICT=1``, so a check that does not pass raises. To keep CI short only the
cells up to the last one that uses a stubbed name run: the cells after it do not depend on the
student's code and already ran in the unsolved run. The convention is in
notebooks/solutions/README.md.
"""

import copy
import json
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tinygemma.course import check, solutions

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def turn_cells(nb) -> list[int]:
    return [i for i, c in enumerate(nb.cells)
            if c.cell_type == "code" and solutions.TAG in c.metadata.get("tags", [])]


def chapters_with_turns() -> list[str]:
    return sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")
                  if turn_cells(nbformat.reads(p.read_text(encoding="utf-8"), as_version=4)))


def read(stem):
    return nbformat.reads((NOTEBOOKS / f"{stem}.ipynb").read_text(encoding="utf-8"), as_version=4)


def test_the_checked_chapters_have_their_turns():
    have = set(chapters_with_turns())
    want = {chapter for chapter, _, _ in check.COMPONENTS.values()}
    assert want <= have, f"no {solutions.TAG} cell in {sorted(want - have)}"


@pytest.mark.parametrize("stem", chapters_with_turns())
def test_committed_turns_are_stubs_with_solutions(stem):
    nb = read(stem)
    solution_file = NOTEBOOKS / "solutions" / f"{stem}_solutions.py"
    for i in turn_cells(nb):
        source = nb.cells[i].source
        names = solutions.stub_names(source)
        assert names, f"{stem} cell {i}: a {solutions.TAG} cell defines no function"
        assert "NotImplementedError" in source, f"{stem} cell {i}: committed solved"
        solutions.solved_cell(source, solution_file)  # raises naming a missing solution


@pytest.mark.parametrize("stem", chapters_with_turns())
def test_chapter_runs_solved(stem, monkeypatch):
    nb = read(stem)
    solution_file = NOTEBOOKS / "solutions" / f"{stem}_solutions.py"
    solved = copy.deepcopy(nb)
    names = set()
    for i in turn_cells(nb):
        names.update(solutions.stub_names(nb.cells[i].source))
        solved.cells[i].source = solutions.solved_cell(nb.cells[i].source, solution_file)
    uses = re.compile(r"\b(" + "|".join(sorted(names)) + r")\b")
    last = max(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and uses.search(c.source))
    solved.cells = solved.cells[:last + 1]
    monkeypatch.setenv(check.STRICT, "1")  # the kernel inherits it: a missed check raises
    NotebookClient(solved, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    text = json.dumps([c.get("outputs", []) for c in solved.cells if c.cell_type == "code"])
    assert "Not written yet" not in text
    if any("check." in c.source for c in solved.cells if c.cell_type == "code"):
        assert "Correct:" in text, f"{stem}: no check passed"
