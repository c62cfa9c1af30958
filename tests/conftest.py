"""Shared fixtures: offline mode, tiny models built once per session, a small synthetic VLGuard."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
from PIL import Image  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    """``tiny(name)`` → ``(model, processor)``, built once per session per name (seed 0).

    Tests must not modify the returned model or processor; build a fresh one when they need to.
    """
    from hsr_lib.tiny import build_tiny

    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = build_tiny(name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def two_images():
    """Two different RGB images of the same non-square size."""
    a = Image.new("RGB", (40, 56), (200, 30, 30))
    b = Image.new("RGB", (40, 56), (30, 30, 200))
    for x in range(0, 40, 4):
        for y in range(0, 56, 8):
            b.putpixel((x, y), (250, 250, 250))
    return a, b


@pytest.fixture(scope="session")
def synthetic_vlguard(tmp_path_factory):
    """A synthetic VLGuard set of 8 records: ``(train_json, image_root, splits)``."""
    from hsr_lib.data import load_records, split_records
    from hsr_lib.synthetic import make_synthetic_vlguard

    root = tmp_path_factory.mktemp("vlguard8")
    tj = make_synthetic_vlguard(root, n_records=8, seed=0)
    splits = split_records(load_records(tj), root, source=tj)
    return tj, root, splits


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """``hsr run params/tiny.yaml`` end to end (every notebook), as the README says, into a
    temporary runs_dir, once per session: ``(run_dir, completed_process)``."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    script = Path(sys.executable).parent / "hsr"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "hsr_lib.cli"]
    runs = tmp_path_factory.mktemp("runs")
    proc = subprocess.run([*cmd, "run", "params/tiny.yaml", "-p", f"runs_dir={runs}"], cwd=root,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return runs / "tiny", proc
