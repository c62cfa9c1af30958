"""The runner: `hsr run` executes the notebooks with papermill into the run directory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from hsr_lib.cli import main, notebooks
from hsr_lib.data import load_records, sample_indices, split_records
from hsr_lib.io import read_json
from hsr_lib.notebook import read_records

ROOT = Path(__file__).resolve().parent.parent
_SCRIPT = Path(sys.executable).parent / "hsr"  # the console script the README uses
HSR = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "hsr_lib.cli"]
TINY = str(ROOT / "params" / "tiny.yaml")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def hsr(*args, cwd=ROOT):
    return subprocess.run([*HSR, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


def test_tiny_run_records_match_the_data(tiny_run):
    run_dir, _ = tiny_run
    rec = read_records(run_dir / "notebooks" / "01_data.ipynb")
    root = run_dir / "data" / "synthetic_vlguard"
    splits = split_records(load_records(root / "train.json"), root)
    assert rec["n_safety"] == len(splits["safety"]) > 0
    assert rec["n_utility"] == rec["n_safe_unsafe"] == len(splits["utility"]) > 0
    ids = [s.id for s in splits["safety"]]
    assert rec["ships_safety_ids"] == [ids[i] for i in sample_indices(len(ids), 16, 114514)]
    cal = rec["calibration_example"]
    assert 0 < cal["start"] < cal["end"] == cal["length"]


def test_tiny_run_manifest_and_outputs(tiny_run):
    run_dir, proc = tiny_run
    m = read_json(run_dir / "manifest.json")
    assert m["notebooks"]["01_data"]["status"] == "ok" and m["notebooks"]["01_data"]["wall_s"] > 0
    assert m["steps"]["data"]["wall_s"] >= 0 and m["versions"]["hsr"]
    assert m["notebooks"]["01_data"]["records"]["n_safety"] > 0
    assert "[1/" in proc.stdout and "01_data" in proc.stdout
    nb = nbformat.read(run_dir / "notebooks" / "01_data.ipynb", as_version=4)
    pngs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert pngs, "the sample-image grid was not rendered"
    # the source notebook stays without outputs
    src = nbformat.read(ROOT / "notebooks" / "01_data.ipynb", as_version=4)
    assert not any(c.get("outputs") for c in src.cells if c.cell_type == "code")


def test_rerun_reuses_the_data_step(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    before = (run_dir / "data" / "_step.json").read_text()
    proc = hsr("run", "params/tiny.yaml", "-p", f"runs_dir={run_dir.parent}", "--to", "01")
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "data" / "_step.json").read_text() == before


def _notebook(path, source):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("params_path = None", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(source)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_failing_notebook_stops_the_run_and_names_the_error(tmp_path):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _notebook(nbs / "01_ok.ipynb", "from hsr_lib.notebook import record\nrecord('x', 1)")
    _notebook(nbs / "02_boom.ipynb", "raise ValueError('boom in step two')")
    _notebook(nbs / "03_never.ipynb", "record('y', 2)")
    proc = hsr("run", "params/tiny.yaml", "-p", f"runs_dir={tmp_path}", "--notebooks", str(nbs))
    assert proc.returncode == 1
    assert "boom in step two" in proc.stderr and str(tmp_path / "tiny" / "notebooks" / "02_boom.ipynb") in proc.stderr
    assert not (tmp_path / "tiny" / "notebooks" / "03_never.ipynb").exists()
    m = read_json(tmp_path / "tiny" / "manifest.json")
    assert m["notebooks"]["01_ok"]["records"] == {"x": 1} and m["notebooks"]["02_boom"]["status"] == "failed"


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
