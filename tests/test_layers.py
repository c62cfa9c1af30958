"""The method layer is shallow: the tensor-level modules load in a fresh interpreter without the
model machinery (pruning, calibration, model loading, transformers)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIGHT = ("hsr_lib.realign", "hsr_lib.sparsity", "hsr_lib.masks", "hsr_lib.ships")
HEAVY = ("hsr_lib.prune", "hsr_lib.models", "hsr_lib.calibration", "transformers")


def test_tensor_level_modules_load_without_the_model_machinery():
    """One fresh interpreter imports all four (what their union loads, none of them loads alone)."""
    code = f"import json, sys, {', '.join(LIGHT)}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    loaded = set(json.loads(out.stdout))
    assert set(LIGHT) <= loaded and "torch" in loaded  # the probe saw the imports it made
    assert not loaded & set(HEAVY), f"importing {', '.join(LIGHT)} loads {sorted(loaded & set(HEAVY))}"
