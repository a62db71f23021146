"""The solution files of the course, and the stub cells they fill in.

A chapter ``NN_name.ipynb`` keeps its solutions in ``notebooks/solutions/NN_name_solutions.py``.
A "your turn" cell (a code cell tagged ``your-turn`` in its metadata) defines stubs, functions
whose body raises ``NotImplementedError``; the solution file defines the same names.
:func:`solved_cell` gives the cell with each stub replaced by the solution's definition, which
is how CI runs every chapter solved (``tests/test_solutions.py``) and how
:func:`tinygemma.course.check.solution` prints an answer. The files live in the repository,
not in the installed package: a wheel has no solutions to show.
"""

from __future__ import annotations

import ast
from pathlib import Path

TAG = "your-turn"  # the cell tag of a stub cell


def directory() -> Path | None:
    """The folder of the solution files: beside the package in a checkout, or near the cwd."""
    here = Path(__file__).resolve().parents[2] / "notebooks" / "solutions"
    for candidate in (here, Path.cwd() / "solutions", Path.cwd() / "notebooks" / "solutions"):
        if candidate.is_dir():
            return candidate
    return None


def file_of(chapter: str) -> Path:
    """The solution file of a chapter given by its number ("03") or its name ("03_rmsnorm")."""
    folder = directory()
    if folder is None:
        raise FileNotFoundError("the solutions are in notebooks/solutions/ of the tinygemma "
                                "repository (they are not installed with the package)")
    matches = sorted(folder.glob(f"{chapter}*_solutions.py"))
    if not matches:
        raise FileNotFoundError(f"no solution file for chapter {chapter!r} in {folder.name}/")
    return matches[0]


def definitions(source: str) -> dict[str, str]:
    """The source of each top-level function of a module, by name."""
    tree = ast.parse(source)
    return {node.name: ast.get_source_segment(source, node)
            for node in tree.body if isinstance(node, ast.FunctionDef)}


def imports(source: str) -> list[str]:
    """The top-level import statements of a module, as source lines."""
    tree = ast.parse(source)
    return [ast.get_source_segment(source, node) for node in tree.body
            if isinstance(node, (ast.Import, ast.ImportFrom))]


def stub_names(cell_source: str) -> list[str]:
    """The functions a stub cell defines, in order."""
    return list(definitions(cell_source))


def solved_cell(cell_source: str, solution_file: Path) -> str:
    """A stub cell with every function it defines replaced by the solution's definition.

    The solution file's imports come first, so a solution may use what its file imports.
    Raises ``KeyError`` naming a stub the solution file does not define.
    """
    source = solution_file.read_text(encoding="utf-8")
    solved = definitions(source)
    names = stub_names(cell_source)
    if not names:
        raise KeyError(f"the {TAG} cell defines no function to fill in")
    missing = [n for n in names if n not in solved]
    if missing:
        raise KeyError(f"{solution_file.name} does not define {', '.join(missing)}")
    return "\n\n\n".join(["\n".join(imports(source))] + [solved[n] for n in names]) + "\n"
