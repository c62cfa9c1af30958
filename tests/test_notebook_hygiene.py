"""The committed notebooks are normalized (every cell has a unique id, so nbformat never warns
about missing ones) and carry no outputs; executed notebooks keep a progress bar's final state only
and no warning (the executed side is checked in test_notebooks.py on the toy and tiny runs)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIP = ("runs", "build", "_build", "node_modules")  # outputs of runs and builds, not the project's own
NOTEBOOKS = sorted(p for d in ROOT.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name not in SKIP
                   for p in d.rglob("*.ipynb") if not any(x.startswith(".") for x in p.relative_to(ROOT).parts))
CELL_ID = re.compile(r"^[a-zA-Z0-9-_]{1,64}$")  # nbformat 4.5's cell id schema


def test_there_are_notebooks():
    assert len([p for p in NOTEBOOKS if p.parent.name == "notebooks"]) >= 7


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_cell_has_a_unique_id(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MissingIDFieldWarning, or any other, fails here
        nb = nbformat.read(str(path), as_version=4)
        nbformat.validate(nb)
    assert (nb.nbformat, nb.nbformat_minor) >= (4, 5), "cell ids need nbformat 4.5"
    ids = [c.get("id") for c in nb.cells]
    assert all(i and CELL_ID.match(i) for i in ids), [i for i in ids if not (i and CELL_ID.match(i))]
    assert len(set(ids)) == len(ids), "duplicate cell ids"


def progress_problems(text: str) -> list[str]:
    """Lines of saved output that are a redraw of a progress bar (a carriage return left in, or a tqdm
    line short of its total)."""
    bad = []
    for line in text.split("\n"):
        if "\r" in line.rstrip("\r"):
            bad.append(line)
            continue
        m = re.search(r"(\d+)/(\d+) \[", line)
        if m and "%|" in line and m.group(1) != m.group(2):
            bad.append(line)
    return bad


def warning_lines(text: str) -> list[str]:
    """Lines that mention a warning or a deprecation."""
    return [line for line in text.splitlines() if re.search(r"warning|deprecat", line, re.IGNORECASE)]


def outputs(path) -> str:
    """Every stream, error and plain-text output of an executed notebook."""
    nb = nbformat.read(str(path), as_version=4)
    parts = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            parts += [o.get("text", ""), o.get("data", {}).get("text/plain", ""), "\n".join(o.get("traceback", []))]
    return "\n".join(parts)


def test_the_output_checks_catch_what_they_should():
    assert progress_problems("  0%|          | 0/4 [00:00<?, ?it/s]\r100%|██████████| 4/4 [00:01<00:00]\n")
    assert progress_problems(" 50%|█████     | 2/4 [00:01<00:01]\n")
    assert not progress_problems("100%|██████████| 4/4 [00:01<00:00, 3.1it/s]\nok\n")
    assert warning_lines("x\nUserWarning: careful\n") == ["UserWarning: careful"]
    assert warning_lines("The `use_fast` parameter is deprecated") and not warning_lines("all fine")
