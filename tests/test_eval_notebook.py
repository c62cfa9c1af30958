"""Notebook 06 runs alone on the tiny params (papermill, via ``hsr run --from 06 --to 06``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat

from hsr_lib.notebook import read_records

ROOT = Path(__file__).resolve().parent.parent
_SCRIPT = Path(sys.executable).parent / "hsr"
HSR = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "hsr_lib.cli"]


def test_notebook_06_on_tiny(tmp_path):
    proc = subprocess.run([*HSR, "run", "params/tiny.yaml", "-p", f"runs_dir={tmp_path}", "--from", "06", "--to", "06"],
                          cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "tiny" / "notebooks" / "06_evaluate.ipynb"
    rec = read_records(out)
    assert rec["variants_evaluated"] == ["dense"]
    assert rec["n_responses"] == 6 * 4  # six fixture benchmarks, n_items 4
    rows = {r["variant"]: r for r in rec["results_table"]}
    assert set(rows) == {"dense", "pruned", "realigned"} and rows["dense"]["method"] == "full"
    assert isinstance(rows["dense"]["avg_asr"], float)
    assert all(rows[v][c] == "nan" for v in ("pruned", "realigned") for c in ("safebench_asr", "rsr_percent"))
    assert "dense/safebench/asr/vlguard" in rec["metrics"] and len(rec["judge_agreement"]) == 3
    nb = nbformat.read(out, as_version=4)
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    src = nbformat.read(ROOT / "notebooks" / "06_evaluate.ipynb", as_version=4)
    assert not any(c.get("outputs") for c in src.cells if c.cell_type == "code")
    assert src.cells[3].metadata.get("tags") == ["parameters"]
