"""The runner: `hsr run` executes the notebooks with papermill into the run directory."""

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from hsr_lib.cli import main, notebooks
from hsr_lib.io import read_json

ROOT = Path(__file__).resolve().parent.parent
_SCRIPT = Path(sys.executable).parent / "hsr"  # the console script the README uses
HSR = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "hsr_lib.cli"]
TINY = str(ROOT / "params" / "tiny.yaml")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def hsr(*args, cwd=ROOT):
    return subprocess.run([*HSR, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


def _notebook(path, source):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("params_path = None\noverrides = {}", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(source)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.mark.notebooks
def test_failing_notebook_stops_the_run_and_names_the_error(tmp_path):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _notebook(nbs / "01_ok.ipynb", "from hsr_lib.notebook import record\nrecord('x', 1)")
    _notebook(nbs / "02_boom.ipynb", "raise ValueError('boom in step two')")
    _notebook(nbs / "03_never.ipynb", "record('y', 2)")
    proc = hsr("run", "params/tiny.yaml", "-p", f"runs_dir={tmp_path}", "--notebooks", str(nbs))
    assert proc.returncode == 1
    assert "boom in step two" in proc.stderr
    assert str(tmp_path / "tiny" / "notebooks" / "02_boom.failed.ipynb") in proc.stderr
    assert not (tmp_path / "tiny" / "notebooks" / "03_never.ipynb").exists()
    m = read_json(tmp_path / "tiny" / "manifest.json")
    assert m["notebooks"]["01_ok"]["records"] == {"x": 1} and "02_boom" not in m["notebooks"]  # the failed copy is its record


def test_bad_override_exits_2_naming_the_key(capsys):
    assert main(["run", TINY, "-p", "pruning.sparsity=1.5"]) == 2
    err = capsys.readouterr().err
    assert "pruning.sparsity" in err and "override" in err


def test_params_command_prints_resolved_values(capsys):
    assert main(["params", TINY, "-p", "pruning.sparsity=0.6"]) == 0
    out = capsys.readouterr().out
    assert "sparsity: 0.6" in out and "fidelity: paper" in out


def test_notebook_selection(tmp_path):
    for name in ("01_a.ipynb", "02_b.ipynb", "03_c.ipynb", "notes.ipynb", "1_x.ipynb"):
        (tmp_path / name).write_text("{}")
    assert [p.name for p in notebooks(tmp_path)] == ["01_a.ipynb", "02_b.ipynb", "03_c.ipynb"]
    assert [p.name for p in notebooks(tmp_path, "02", "02")] == ["02_b.ipynb"]
    assert [p.name for p in notebooks(tmp_path, first="2")] == ["02_b.ipynb", "03_c.ipynb"]


def test_bad_from_flag_is_refused():
    with pytest.raises(SystemExit):
        main(["run", TINY, "--from", "two"])


def test_empty_selection_exits_2(tmp_path, capsys):
    assert main(["run", TINY, "-p", f"runs_dir={tmp_path}", "--notebooks", str(tmp_path)]) == 2
    assert "no notebooks" in capsys.readouterr().err
