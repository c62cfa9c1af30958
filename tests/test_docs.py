"""docs/library.md is true to the code: the hsr_lib modules each notebook imports (read from the
notebooks with ``ast``) are the ones its table lists, and every module of the library is named."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "library.md"


def notebook_imports(path: Path) -> set[str]:
    """The ``hsr_lib`` modules a notebook's code cells import, without the ``hsr_lib.`` prefix."""
    mods: set[str] = set()
    for cell in nbformat.read(str(path), as_version=4).cells:
        if cell.cell_type != "code":
            continue
        src = "\n".join(ln for ln in cell.source.splitlines() if not ln.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Import):
                mods |= {a.name for a in node.names if a.name.split(".")[0] == "hsr_lib"}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "hsr_lib":
                mods |= {f"hsr_lib.{a.name}" for a in node.names} if node.module == "hsr_lib" else {node.module}
    return {m.removeprefix("hsr_lib.") for m in mods if m != "hsr_lib"}


def documented() -> dict[str, set[str]]:
    """The table under 'What each notebook imports': notebook → modules."""
    text = DOC.read_text()
    section = text.split("## What each notebook imports", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d\d_\w+) \| (.*) \|$", section, flags=re.M)
    return {nb: set(re.findall(r"`([\w.]+)`", mods)) for nb, mods in rows}


def test_the_checker_reads_every_kind_of_import(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "%matplotlib inline\nfrom hsr_lib import notebook as hnb, steps\nimport hsr_lib.views\n"
        "from hsr_lib.evaluate.paper import x\nimport torch")])
    nbformat.write(nb, str(tmp_path / "x.ipynb"))
    assert notebook_imports(tmp_path / "x.ipynb") == {"notebook", "steps", "views", "evaluate.paper"}


def test_library_doc_lists_what_each_notebook_imports():
    table = documented()
    found = {p.stem: notebook_imports(p) for p in sorted((ROOT / "notebooks").glob("0*.ipynb"))}
    assert sorted(table) == sorted(found), "docs/library.md: one row per notebook"
    wrong = {nb: {"doc only": sorted(table[nb] - mods), "notebook only": sorted(mods - table[nb])}
             for nb, mods in found.items() if table[nb] != mods}
    assert not wrong, f"docs/library.md 'What each notebook imports' differs from the notebooks: {wrong}"


def test_library_doc_names_every_module():
    text = DOC.read_text()
    pkg = ROOT / "hsr_lib"
    names = [p.stem for p in pkg.glob("*.py") if p.stem != "__init__"]
    names += [p.name for p in pkg.iterdir() if (p / "__init__.py").is_file()]
    missing = [n for n in names if not re.search(rf"`(hsr_lib\.)?{n}(/|`)", text)]
    assert not missing, f"docs/library.md does not name {missing}"
