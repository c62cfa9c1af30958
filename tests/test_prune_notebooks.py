"""Notebooks 03 (scores) and 04 (prune) run end to end with `hsr run` on the tiny default."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from hsr_lib.notebook import read_records

ROOT = Path(__file__).resolve().parent.parent
_SCRIPT = Path(sys.executable).parent / "hsr"
HSR = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "hsr_lib.cli"]
NOTEBOOKS = ("03_scores", "04_prune")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    proc = subprocess.run([*HSR, "run", "params/tiny.yaml", "-p", f"runs_dir={runs}", "--from", "03", "--to", "04"],
                          cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return runs / "tiny"


def test_scores_notebook_records(run_dir):
    rec = read_records(run_dir / "notebooks" / "03_scores.ipynb")
    assert rec["score_methods"] == ["wanda", "sparsegpt", "snip"]
    assert len(rec["score_files"]) == 6 and all((run_dir / "scores" / f).exists() for f in rec["score_files"])
    assert 0 <= rec["overlap_mean"] <= 1 and rec["overlap_chance"] == 0.5
    assert -1 <= rec["spearman_example"]["rho"] <= 1


def test_prune_notebook_records(run_dir):
    rec = read_records(run_dir / "notebooks" / "04_prune.ipynb")
    assert (rec["prune_method"], rec["prune_pattern"], rec["sparsity_reached"]) == ("wanda", "unstructured", 0.5)
    assert rec["n_modules_pruned"] == 28  # 4 layers × 7 linears of tiny:qwen2_5_vl
    loss = rec["heldout_loss"]
    assert loss["n"] > 0 and math.isfinite(loss["dense"]) and math.isfinite(loss["pruned"])
    assert (run_dir / "prune" / "mask.safetensors").exists() and (run_dir / "prune" / "sparsity.csv").exists()


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_source_notebooks_are_committed_without_outputs(name):
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not any(c.get("outputs") or c.get("execution_count") for c in code)
    assert any("parameters" in c.metadata.get("tags", []) for c in code)
    assert "colab.research.google.com" in nb.cells[0].source
