"""The student version of the exercises, written from the instructor notebooks (nbgrader's conventions):
code between ``### BEGIN SOLUTION`` and ``### END SOLUTION`` becomes ``# YOUR CODE HERE`` /
``raise NotImplementedError()``; a markdown cell marked as a solution keeps only its leading bold label
and says ``YOUR ANSWER HERE``; outputs are cleared."""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat

from ..notebook import PROJECT_ROOT

EXERCISES = PROJECT_ROOT / "course" / "exercises"
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
CODE_STUB = ("# YOUR CODE HERE", "raise NotImplementedError()")
ANSWER_STUB = "YOUR ANSWER HERE"
_LABEL = re.compile(r"^\*\*[^*]+\*\*")


class SolutionMarkerError(ValueError):
    """A solution block that is not closed, or closed without being opened (the message names the cell)."""


def strip_code(source: str, where: str = "cell") -> str:
    """``source`` with every solution block replaced by the stub, indented like its marker."""
    out: list[str] = []
    inside = False
    for n, line in enumerate(source.splitlines(), 1):
        if BEGIN in line:
            if inside:
                raise SolutionMarkerError(f"{where}, line {n}: {BEGIN} inside an open solution block")
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            out.extend(indent + s for s in CODE_STUB)
        elif END in line:
            if not inside:
                raise SolutionMarkerError(f"{where}, line {n}: {END} without {BEGIN}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise SolutionMarkerError(f"{where}: {BEGIN} is never closed by {END}")
    return "\n".join(out)


def is_solution(cell) -> bool:
    """Whether nbgrader's metadata marks ``cell`` as a solution cell."""
    return bool(cell.get("metadata", {}).get("nbgrader", {}).get("solution"))


def student_notebook(nb):
    """A copy of the instructor notebook ``nb`` with the solutions taken out and the outputs cleared."""
    nb = nbformat.from_dict(nb)
    for i, cell in enumerate(nb.cells):
        where = f"cell {i} ({cell.get('id', '?')})"
        if cell.cell_type == "code":
            cell.source = strip_code(cell.source, where)
            cell.outputs, cell.execution_count = [], None
            cell.metadata.pop("papermill", None)
            cell.metadata.pop("execution", None)
        elif cell.cell_type == "markdown" and (is_solution(cell) or BEGIN in cell.source):
            label = _LABEL.match(cell.source.strip())
            cell.source = f"{label.group(0)} {ANSWER_STUB}" if label else ANSWER_STUB
    nb.metadata.pop("papermill", None)
    return nb


def write_student(out: str | os.PathLike, source: str | os.PathLike = EXERCISES) -> list[Path]:
    """Write the student version of every ``NN_*.ipynb`` in ``source`` into ``out``; the paths written."""
    src, dst = Path(source), Path(out)
    found = sorted(src.glob("[0-9][0-9]_*.ipynb"))
    if not found:
        raise FileNotFoundError(f"no exercise notebooks NN_*.ipynb in {src}")
    if dst.resolve() == src.resolve():
        raise ValueError(f"{dst}: the student version must not overwrite the instructor notebooks")
    dst.mkdir(parents=True, exist_ok=True)
    written = []
    for path in found:
        nb = student_notebook(nbformat.read(path, as_version=4))
        target = dst / path.name
        nbformat.write(nb, target)
        written.append(target)
    return written
