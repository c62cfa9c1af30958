"""Sweeps: the grid (product and zip), every executor on a 2×2 tiny sweep (in process, local
processes sharing one run directory, and submitit's local executor standing in for Slurm),
resuming only what is missing, failing points reported without stopping the others."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TINY
from hsr_lib.cli import main
from hsr_lib.sweep import SweepError, load_sweep, point_id, run_sweep, slurm_parameters, status_table

SMALL = {"data.n_ships": [4], "data.n_scores": [4], "eval.benchmarks": [["safebench", "vlguard_unsafe"]],
         "eval.n_items": [2], "eval.max_new_tokens": [4], "eval.variants": [["dense", "pruned", "hsr"]]}


def write_sweep(tmp_path, grid, executor=None, zipped=None, name="s") -> Path:
    spec = {"base": str(TINY), "sweep": {**SMALL, "runs_dir": [str(tmp_path / "runs")], **grid},
            "executor": executor or {"kind": "local"}}
    if zipped:
        spec["zip"] = zipped
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def markers(runs: Path) -> dict[str, str]:
    return {str(p.relative_to(runs)): p.read_text() for p in runs.glob("*/*/*/_step.json")}


def test_the_grid_is_the_product_with_zipped_keys_varying_together(tmp_path):
    sw = load_sweep(write_sweep(tmp_path, {"pruning.sparsity": [0.4, 0.6], "realign.p": [0.6, 0.4],
                                           "realign.p_max": [0.9, 0.7], "realign.q": [0.3, 0.5, 0.7]},
                                zipped=[["pruning.sparsity", "realign.p", "realign.p_max"]]))
    assert len(sw.points) == 2 * 3
    pairs = {(p["pruning.sparsity"], p["realign.p"], p["realign.p_max"]) for p in sw.points}
    assert pairs == {(0.4, 0.6, 0.9), (0.6, 0.4, 0.7)}
    P = sw.params(sw.points[0])
    assert P.run_name == "tiny-qwen2_5_vl" and P.runs_dir == str(tmp_path / "runs")  # the model's run directory
    assert len({point_id(p) for p in sw.points}) == 6


@pytest.mark.parametrize("spec,needle", [
    ({"sweep": {}}, "base: missing"),
    ({"base": "nope.yaml"}, "no such params file"),
    ({"base": str(TINY), "sweep": {"realign.q": 0.5}}, "non-empty lists"),
    ({"base": str(TINY), "sweep": {"realign.q": [0.5], "realign.p": [0.5, 0.6]}, "zip": [["realign.q", "realign.p"]]},
     "lists of one length"),
    ({"base": str(TINY), "sweep": {"realign.q": [7]}}, "realign.q"),
    ({"base": str(TINY), "grid": {}}, "unknown key 'grid'"),
    ({"base": str(TINY), "executor": {"kind": "mpi"}}, "executor.kind"),
])
def test_bad_sweep_files_are_named(tmp_path, spec, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SweepError, match=needle):
        load_sweep(path)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A 2×2 tiny sweep run in process, notebook 07 executed over it at the end: ``(tmp_path, path, rows)``.
    Shared within this module: the tests that only read it come first, the resume test changes it last."""
    tmp = tmp_path_factory.mktemp("sweep2x2")
    path = write_sweep(tmp, {"pruning.sparsity": [0.4, 0.5], "realign.q": [0.3, 0.5]})
    return tmp, path, run_sweep(path)


@pytest.mark.slow
def test_results_are_one_tidy_table_of_the_points(swept):
    """``sweep.results``: a row per point, variant and metrics.csv row, with the settings and the keys."""
    import pandas as pd

    from hsr_lib.io import read_json
    from hsr_lib.sweep import results

    tmp, _, rows = swept
    res = results(tmp / "runs" / "sweeps" / "s")
    metrics = {r["point"]: pd.read_csv(Path(r["run_dir"]) / r["evaluation"] / "metrics.csv", keep_default_na=False,
                                       na_values={"value": [""]}) for r in rows}
    assert len(res) == sum(len(m) for m in metrics.values()) and res.point.nunique() == 4
    for r in rows:
        mine = res[res.point == r["point"]]
        assert (mine.sparsity == r["values"]["pruning.sparsity"]).all() and (mine.q == r["values"]["realign.q"]).all()
        assert mine.value.sum() == pytest.approx(metrics[r["point"]].value.sum())
        assert set(mine.evaluate_key) == {Path(r["evaluation"]).name} and (mine.run_dir == r["run_dir"]).all()
        hsr = mine[mine.variant == "hsr"]
        summary = read_json(Path(r["run_dir"]) / "realign" / hsr.realign_key.iloc[0] / "summary.json")
        assert (hsr.restored_ratio_permyriad == summary["restored_ratio_permyriad"]).all()
        assert (mine[mine.variant != "hsr"].realign_key == "").all()
    assert res.ships_key.nunique() == 1 and res.prune_key.nunique() == 2 and res.realign_key.nunique() == 5
    assert list(res.columns[:8]) == ["point", "model", "method", "sparsity", "pattern", "p", "q", "p_max"]


@pytest.mark.slow
def test_notebook_07_works_on_a_sweep_without_the_toy_benchmarks(swept):
    """The tiny sweep has no toy benchmark: the toy sections say so in a line and step aside; the
    others (Ships agreement, judges, the paper's side) still run."""
    from hsr_lib.notebook import read_records
    from test_notebooks import outputs_text

    tmp, _, _ = swept
    out = tmp / "runs" / "sweeps" / "s" / "07_findings.ipynb"
    rec = read_records(out)
    assert rec["n_points"] == 4 and rec["models"] == ["tiny:qwen2_5_vl"] and rec["has_toy_benchmarks"] is False
    assert len(rec["ships_agreement"]) == 1 and "sparsity_asr" not in rec and "q_sweep" not in rec
    assert outputs_text(out).count("needs the toy's benchmarks") == 6


@pytest.mark.slow
def test_a_2x2_sweep_in_process_then_resume_only_the_missing_point(swept):
    tmp_path, path, rows = swept
    assert [r["status"] for r in rows] == ["done"] * 4 and len({r["evaluation"] for r in rows}) == 4
    runs = tmp_path / "runs"
    keys = markers(runs)
    assert sum(k.startswith("tiny-qwen2_5_vl/prune/") for k in keys) == 2  # one pruning per sparsity
    assert sum(k.startswith("tiny-qwen2_5_vl/ships/") for k in keys) == 1  # Ships once for all points
    # a killed sweep: one point's evaluation missing; the re-run finishes only that one
    gone = rows[1]["evaluation"].split(":")[-1] if ":" in rows[1]["evaluation"] else rows[1]["evaluation"]
    shutil.rmtree(Path(rows[1]["run_dir"]) / gone)
    before = {k: v for k, v in markers(runs).items()}
    again = run_sweep(path, findings=False)
    assert all(r["done"] for r in again)
    after = markers(runs)
    assert {k for k in after if after[k] != before.get(k)} == {f"tiny-qwen2_5_vl/{gone}/_step.json"}
    st = status_table(path)
    assert st["done"].all() and len(st) == 4
    assert json.loads((tmp_path / "runs" / "sweeps" / "s" / "points.json").read_text())["points"][0]["done"]


def test_notebook_07_reads_no_file_and_lists_no_folder_itself():
    import nbformat

    nb = nbformat.read(ROOT / "notebooks" / "07_findings.ipynb", as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    for needle in ("read_csv", "read_json", "glob(", "open(", "iterdir", "read_text", "points.json", "metrics.csv",
                   "summary.json", "listdir"):
        assert needle not in code, needle
    assert "results(sweep_dir)" in code


def test_results_of_a_folder_that_is_no_finished_sweep_is_named(tmp_path):
    from hsr_lib.sweep import results

    with pytest.raises(SweepError, match="no points.json"):
        results(tmp_path)


@pytest.mark.slow
def test_processes_share_one_run_directory(tmp_path):
    path = write_sweep(tmp_path, {"pruning.sparsity": [0.4, 0.5], "realign.q": [0.3, 0.5]},
                       {"kind": "processes", "workers": 2})
    rows = run_sweep(path, findings=False)
    assert [r["status"] for r in rows] == ["done"] * 4


@pytest.mark.slow
def test_slurm_through_submitit_runs_a_2x2_sweep_here(tmp_path):
    pytest.importorskip("submitit")
    executor = {"kind": "slurm", "cluster": "local", "partition": "gpu", "gpus_per_node": 0, "timeout_min": 10,
                "mem_gb": 8}
    path = write_sweep(tmp_path, {"pruning.sparsity": [0.4, 0.5], "realign.q": [0.3, 0.5]}, executor)
    rows = run_sweep(path, findings=False)
    assert [r["status"] for r in rows] == ["done"] * 4
    assert (tmp_path / "runs" / "sweeps" / "s" / "slurm").is_dir()  # submitit's job folders
    assert slurm_parameters({"partition": "gpu", "gpus_per_node": 1, "timeout_min": 120, "mem_gb": 64}) == {
        "timeout_min": 120, "mem_gb": 64, "name": "hsr-sweep", "cpus_per_task": 4, "slurm_partition": "gpu",
        "gpus_per_node": 1}


def test_a_point_with_bad_inputs_stops_the_sweep_before_anything_runs(tmp_path, capsys):
    path = write_sweep(tmp_path, {"realign.q": [0.3, 0.5], "eval.data_roots": [{}, None]})
    spec = yaml.safe_load(path.read_text())
    base_roots = yaml.safe_load(TINY.read_text())["eval"]["data_roots"]
    spec["sweep"]["eval.data_roots"] = [{}, {k: str((TINY.parent / v).resolve()) for k, v in base_roots.items()}]
    path.write_text(yaml.safe_dump(spec))
    code = main(["sweep", str(path), "--no-findings"])
    err = capsys.readouterr().err
    assert code == 2 and "eval.data_roots.safebench is not set" in err and "point " in err
    assert not (tmp_path / "runs").exists()  # a failing point at run time: tests/test_faults.py


def test_dry_run_lists_the_shared_upstream_and_writes_nothing(tmp_path, capsys):
    path = write_sweep(tmp_path, {"pruning.sparsity": [0.4, 0.5]})
    assert main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 points, 2 to run" in out and out.count(": prune/wanda-") == 2 and out.count(": ships/") == 1
    assert not (tmp_path / "runs").exists()


def test_the_paper_grid_plans_on_a_laptop(capsys):
    """The cluster grid's dry run: 18 points (six models × three methods), one run directory per model,
    the Slurm parameters it would submit with; nothing is run or written."""
    path = ROOT / "params" / "sweeps" / "paper_grid.yaml"
    sw = load_sweep(path)
    assert len(sw.points) == 18 and len({sw.params(p).run_name for p in sw.points}) == 6
    assert {sw.params(p).model.family for p in sw.points} == {"qwen2_5_vl", "qwen2_vl", "llava_next", "mllama"}
    assert slurm_parameters(sw.executor)["slurm_partition"] == "gpu"
    assert main(["sweep", str(path), "--dry-run"]) == 0
    assert "18 points, 18 to run (slurm" in capsys.readouterr().out


def test_the_shipped_sweep_files_load():
    for path in sorted((ROOT / "params" / "sweeps").glob("*.yaml")):
        if "sweep" in (yaml.safe_load(path.read_text()) or {}):
            assert load_sweep(path).points, path


@pytest.mark.slow
@pytest.mark.notebooks
def test_a_toy_sweep_ends_with_notebook_07(tmp_path):
    """A small toy sweep (2 sparsities × 2 q) through `hsr sweep`: notebook 07 runs over its points,
    and what it records follows from them and from the paper's tables."""
    from hsr_lib.notebook import read_records
    from hsr_lib.reference import claim

    spec = {"base": str(ROOT / "params" / "toy.yaml"),
            "sweep": {"runs_dir": [str(tmp_path / "runs")], "pruning.sparsity": [0.7, 0.8], "realign.p": [0.3, 0.2],
                      "realign.p_max": [0.6, 0.5], "realign.q": [0.05, 0.5],
                      "eval.variants": [["dense", "pruned", "hsr", "hsr_a", "random_heads@0"]]},
            "zip": [["pruning.sparsity", "realign.p", "realign.p_max"]]}
    path = tmp_path / "toy_small.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["sweep", str(path)]) == 0
    out = tmp_path / "runs" / "sweeps" / "toy_small" / "07_findings.ipynb"
    rec = read_records(out)
    assert rec["n_points"] == 4 and rec["models"] == ["toy:qwen2_vl"]
    assert rec["paper_spearman"] == claim("spearman_total_ships_vs_safety_degradation_six_models")
    assert rec["paper_degradations"]["Qwen2-VL"] == pytest.approx(15.47, abs=0.01)  # the paper's README: 15.47
    assert rec["sparsity_asr"]["pruned@0.8"] > rec["sparsity_asr"]["pruned@0.7"]  # more pruning, less safety
    assert set(rec["q_sweep"]) == {"0.05", "0.5"}
    from hsr_lib import toy_study
    from hsr_lib.sweep import results

    res = results(tmp_path / "runs" / "sweeps" / "toy_small")  # what 07 read, through the same library call
    at = res[(res.sparsity == 0.8) & (res.q == 0.5)]
    assert res.point.nunique() == 4 and rec["has_toy_benchmarks"] is True
    assert rec["sparsity_asr"]["pruned@0.8"] == pytest.approx(toy_study.numbers(at).set_index("variant").asr["pruned"])
