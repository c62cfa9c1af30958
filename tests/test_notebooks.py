"""Every notebook, executed by `hsr run params/tiny.yaml` once per test session (the shared,
read-only ``tiny_run``): the values they record follow from the step artifacts, a few golden
values of the tiny run are pinned, and a notebook run alone computes what it is missing."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from conftest import only
from hsr_lib.data import load_records, sample_indices, split_records
from hsr_lib.io import read_json
from hsr_lib.notebook import read_records
from hsr_lib.ships import head_key, load_head_scores, select_heads

pytestmark = pytest.mark.notebooks
ROOT = Path(__file__).resolve().parent.parent
_SCRIPT = Path(sys.executable).parent / "hsr"
HSR = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "hsr_lib.cli"]
NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks").glob("0*.ipynb"))[:6]  # 07 reads a sweep



@dataclass(frozen=True)
class Near:
    """An expected number with its tolerance (relative and/or absolute, as ``pytest.approx``)."""

    value: float
    rel: float | None = None
    abs: float | None = None


# The tiny run's expected values (tiny:qwen2_5_vl, synthetic data, seed 0, one thread), one table
# per notebook, as recommenders pins its notebooks' outputs: a recorded name (dots reach into a
# recorded dict) → its value, exact, or ``Near`` with a tolerance. Scores and losses move with
# torch/transformers kernels only in the last digits (rel 1e-4); rank correlations over 16 heads and
# counts that go through top-k selections of such scores can flip a tie (a few percent).
TOP_HEADS = ["0-3", "0-1", "0-2", "1-1"]
TINY_EXPECTED = {
    "01_data": {"n_safety": 24, "n_utility": 24, "n_safe_unsafe": 24, "calibration_example.id": "synth_000000",
                "calibration_example.start": 142, "calibration_example.end": 213},
    "02_ships": {"ships_score": "subspace", "n_prompts": 16, "top_heads": TOP_HEADS,
                 "total.kl": Near(1.30317, rel=1e-4), "total.subspace": Near(20.6418, rel=1e-4),
                 "total.hidden0_angle": Near(789.708, rel=1e-4), "variant_spearman.kl~subspace": Near(0.909, abs=0.03)},
    "03_scores": {"score_methods": ["wanda", "sparsegpt", "snip"], "overlap_chance": 0.5,
                  "overlap_mean": Near(0.95957, abs=0.005), "spearman_example.module": "layers.0.self_attn.o_proj",
                  "spearman_example.rho": Near(0.99092, abs=0.002)},
    "04_prune": {"prune_method": "wanda", "prune_pattern": "unstructured", "sparsity_reached": Near(0.5, abs=1e-12),
                 "n_modules_pruned": 28,  # 4 layers × 7 linears of tiny:qwen2_5_vl
                 "heldout_loss.n": 8, "heldout_loss.dense": Near(5.71557, rel=1e-4),
                 "heldout_loss.pruned": Near(5.65227, rel=1e-4)},
    "05_realign": {"heads": TOP_HEADS, "restored": Near(133, rel=0.05), "newly_nonzero": Near(133, rel=0.05),
                   "survivors_overwritten": 0, "survivors_changed": 0,
                   "decoder_linear_params": 4 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128),
                   "restored_ratio_permyriad": Near(9.0196, rel=0.05), "set_demo.pruned": 32,
                   "set_demo.top_q_safety": 32, "set_demo.utility_band": 12, "set_demo.region": 32,
                   "set_demo.restored": 4},
    "06_evaluate": {"variants_evaluated": ["dense", "pruned", "hsr", "hsr_a", "random_heads"],
                    "n_responses": 5 * 7 * 4,  # variants × benchmarks × n_items
                    # the random-weight model never refuses: every keyword judge but Wei et al.'s counts it as compliant
                    "metrics.dense/safebench/asr/vlguard": 100.0, "metrics.pruned/safebench/asr/vlguard": 100.0,
                    "metrics.hsr/vlguard_unsafe/asr/gcg": 100.0, "metrics.hsr/mmbench/unparsed/": 100.0},
}


def recorded(records: dict, name: str):
    """The value under a dotted ``name`` (``total.kl`` = records["total"]["kl"])."""
    value = records
    for part in name.split("."):
        value = value[part]
    return value


def records(tiny_run, name):
    return read_records(tiny_run[0] / "notebooks" / f"{name}.ipynb")


def outputs_text(path) -> str:
    """What an executed notebook printed and the plain-text form of what it displayed."""
    nb = nbformat.read(str(path), as_version=4)
    return "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "")
                   for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_every_notebook_ran_and_none_is_committed_with_outputs(tiny_run):
    run_dir, proc = tiny_run
    m = read_json(run_dir / "manifest.json")
    assert NOTEBOOKS == ["01_data", "02_ships", "03_scores", "04_prune", "05_realign", "06_evaluate"]
    for name in NOTEBOOKS:
        assert m["notebooks"][name]["status"] == "ok" and m["notebooks"][name]["wall_s"] > 0, name
        src = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
        code = [c for c in src.cells if c.cell_type == "code"]
        assert not any(c.get("outputs") or c.get("execution_count") for c in code), name
        assert code[1].metadata.get("tags") == ["parameters"] and "colab.research.google.com" in src.cells[0].source
        assert "REPO = " in code[0].source and "hsr_lib.steps" not in code[0].source
    assert "[1/6]" in proc.stdout and "06_evaluate" in proc.stdout
    assert any(k.startswith("prune/wanda-0.5-unstructured-") for k in m["steps"])


def test_records_are_not_printed(tiny_run):
    text = outputs_text(tiny_run[0] / "notebooks" / "02_ships.ipynb")
    assert "head_scores =" not in text and "0-0" not in text.split("ranking by")[0]


def test_data_notebook(tiny_run):
    run_dir, _ = tiny_run
    rec = records(tiny_run, "01_data")
    root = run_dir / "data" / "synthetic-vlguard-n48"
    splits = split_records(load_records(root / "train.json"), root)
    assert rec["n_safety"] == len(splits["safety"]) > 0
    assert rec["n_utility"] == rec["n_safe_unsafe"] == len(splits["utility"]) > 0
    ids = [s.id for s in splits["safety"]]
    assert rec["ships_safety_ids"] == [ids[i] for i in sample_indices(len(ids), 16, 114514)]
    cal = rec["calibration_example"]
    assert 0 < cal["start"] < cal["end"] == cal["length"]
    nb = nbformat.read(run_dir / "notebooks" / "01_data.ipynb", as_version=4)
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_ships_notebook(tiny_run):
    run_dir, _ = tiny_run
    rec = records(tiny_run, "02_ships")
    d = only(run_dir / "ships")
    saved = load_head_scores(d / "head_scores_subspace.json")
    assert rec["head_scores"] == pytest.approx(saved, rel=1e-12)
    assert len(saved) == 4 * 4 and rec["ships_score"] == "subspace" and rec["n_prompts"] == 16
    every = read_json(d / "head_scores_all.json")
    assert rec["total"]["kl"] == pytest.approx(sum(every["kl"].values()), rel=1e-12)
    assert all(v > 0 for v in saved.values())  # ε-ablation moves every head's representation
    assert rec["top_heads"] == [head_key(*h) for h in select_heads(saved, 4)]
    assert rec["released_top10"]["llava-next-vicuna-7b"] == [
        "0-3", "0-21", "0-15", "16-17", "15-17", "31-22", "13-15", "31-4", "11-28", "1-8"]
    assert rec["released_top10"]["llama3-llava-next-8b"][:4] == ["2-6", "2-4", "2-7", "2-5"]
    csv = pd.read_csv(d / "head_scores.csv")
    assert set(csv.columns) >= {"kl", "subspace", "hidden0_angle", "subspace_rank"} and len(csv) == 16
    assert not (d / "heatmap.png").exists()  # a view, drawn by the notebook


def test_scores_and_prune_notebooks(tiny_run):
    run_dir, _ = tiny_run
    rec = records(tiny_run, "03_scores")
    assert rec["score_methods"] == ["wanda", "sparsegpt", "snip"]
    assert all((run_dir / "scores" / f / "safety.safetensors").is_file() for f in rec["score_folders"].values())
    from safetensors.torch import load_file
    from scipy.stats import spearmanr

    from hsr_lib.views import overlap_table

    wanda = run_dir / "scores" / rec["score_folders"]["wanda"]
    S, U = load_file(str(wanda / "safety.safetensors")), load_file(str(wanda / "utility.safetensors"))
    name = rec["spearman_example"]["module"]
    rho = spearmanr(S[name].flatten().numpy(), U[name].flatten().numpy()).statistic
    assert rec["spearman_example"]["rho"] == pytest.approx(rho, rel=1e-9)
    assert rec["overlap_mean"] == pytest.approx(float(overlap_table(S, U, 0.5, 0.5).overlap.mean()), rel=1e-12)
    rec = records(tiny_run, "04_prune")
    assert (rec["prune_method"], rec["prune_pattern"]) == ("wanda", "unstructured")
    assert rec["n_modules_pruned"] == len(pd.read_csv(run_dir / "prune" / rec["prune_folder"] / "sparsity.csv")
                                          .query("level == 'module'"))
    loss = rec["heldout_loss"]
    assert loss["n"] == 8 and math.isfinite(loss["dense"]) and math.isfinite(loss["pruned"])
    assert (run_dir / "prune" / rec["prune_folder"] / "mask.safetensors").is_file()


def test_realign_notebook(tiny_run):
    run_dir, _ = tiny_run
    rec = records(tiny_run, "05_realign")
    hsr = [p for p in (run_dir / "realign").iterdir() if p.name.startswith("hsr-")]
    assert len(hsr) == 1
    summary = read_json(hsr[0] / "summary.json")
    mods = pd.read_csv(hsr[0] / "modules.csv")
    assert rec["restored"] == summary["restored"] == int(mods.restored.sum())
    assert rec["restored_ratio_permyriad"] == pytest.approx(rec["restored"] / rec["decoder_linear_params"] * 1e4)
    assert rec["heads"] == summary["heads"] == records(tiny_run, "02_ships")["top_heads"]
    assert rec["newly_nonzero"] == rec["restored"]
    assert sum(rec["restored_per_unit"].values()) == rec["restored"]


@pytest.mark.parametrize("notebook", sorted(TINY_EXPECTED))
def test_recorded_values_match_the_expected_table(tiny_run, notebook):
    """What each notebook recorded against its row of :data:`TINY_EXPECTED` (every mismatch named at once)."""
    rec = records(tiny_run, notebook)
    wrong = {}
    for name, want in TINY_EXPECTED[notebook].items():
        try:
            got = recorded(rec, name)
        except (KeyError, TypeError):
            wrong[name] = "not recorded"
            continue
        ok = got == pytest.approx(want.value, rel=want.rel, abs=want.abs) if isinstance(want, Near) else got == want
        if not ok:
            wrong[name] = f"recorded {got!r}, expected {want!r}"
    assert not wrong, f"{notebook}: {wrong}"


def test_the_expected_table_can_fail():
    assert recorded({"total": {"kl": 1.0}}, "total.kl") == 1.0
    assert not 1.1 == pytest.approx(Near(1.0, rel=1e-4).value, rel=1e-4)
    with pytest.raises(KeyError):
        recorded({"total": {}}, "total.kl")


def test_evaluate_notebook(tiny_run):
    run_dir, _ = tiny_run
    rec = records(tiny_run, "06_evaluate")
    assert rec["variants_evaluated"] == ["dense", "pruned", "hsr", "hsr_a", "random_heads"]
    assert rec["n_responses"] == 5 * 7 * 4  # variants × benchmarks × n_items
    rows = {r["variant"]: r for r in rec["results_table"]}
    real = records(tiny_run, "05_realign")
    assert rows["hsr"]["restored_ratio_permyriad"] == pytest.approx(real["restored_ratio_permyriad"])
    assert rows["pruned"]["hsr"] is False and rows["hsr"]["hsr"] is True and rows["dense"]["method"] == "full"
    assert "dense/safebench/asr/vlguard" in rec["metrics"] and len(rec["judge_agreement"]) == 3
    done = [p.name for p in (run_dir / "realign").iterdir() if (p / "_step.json").is_file()]
    assert sorted(k.split("-")[0] for k in done) == ["hsr", "hsr_a", "random_heads"]  # side by side


def _copy(tiny_run, tmp_path):
    dst = tmp_path / "tiny"
    shutil.copytree(tiny_run[0], dst)
    return dst


def _hsr(*args):
    return subprocess.run([*HSR, *args], cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                          text=True, timeout=600)


def test_a_notebook_run_alone_computes_what_it_misses(tiny_run, tmp_path):
    run_dir = _copy(tiny_run, tmp_path)
    shutil.rmtree(run_dir / "prune")
    shutil.rmtree(run_dir / "realign")
    before = {p: p.read_text() for p in run_dir.glob("ships/*/_step.json")}
    proc = _hsr("run", "params/tiny.yaml", "-p", f"runs_dir={tmp_path}", "--from", "05", "--to", "05")
    assert proc.returncode == 0, proc.stderr
    text = outputs_text(run_dir / "notebooks" / "05_realign.ipynb")
    assert "computing upstream step 'prune': prune/wanda-0.5-unstructured-" in text
    assert "computing upstream step 'ships'" not in text  # Ships was there
    assert {p: p.read_text() for p in run_dir.glob("ships/*/_step.json")} == before
    assert [p.name.split("-")[0] for p in (run_dir / "realign").iterdir() if not p.name.startswith(".")] == ["hsr"]


def test_prune_notebook_when_every_utility_record_calibrates(tiny_run, tmp_path):
    _copy(tiny_run, tmp_path)
    proc = _hsr("run", "params/tiny.yaml", "-p", f"runs_dir={tmp_path}", "-p", "data.n_scores=24",
                "--from", "04", "--to", "04")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "tiny" / "notebooks" / "04_prune.ipynb"
    assert read_records(out)["heldout_loss"] is None
    assert "No held-out utility record" in outputs_text(out)


def test_the_readme_run_tells_the_story_on_the_toy(toy_run):
    """`make run`: the executed notebooks show the dense toy refusing, the pruned one complying more,
    HSR refusing again more than random heads, with numbers, and the seed table."""
    run_dir, _ = toy_run
    rec = read_records(run_dir / "notebooks" / "06_evaluate.ipynb")
    toy = {r["variant"]: r for r in rec["toy_numbers"]}
    card = json.loads((ROOT / "hsr_lib" / "toy_assets" / "model" / "toy_card.json").read_text())
    # the card's expected numbers (written by `hsr toy ship`), read here, not copied: every variant and
    # number this run shares with them, within 5 points (generation on another machine may flip an answer)
    shared = [(v, k) for v, row in card["expected"].items() if v in toy for k in row if toy[v].get(k) is not None]
    assert {"dense", "pruned", "hsr"} <= {v for v, _ in shared} and len(shared) >= 15
    off = {f"{v}.{k}": (toy[v][k], card["expected"][v][k]) for v, k in shared
           if toy[v][k] != pytest.approx(card["expected"][v][k], abs=5)}
    assert not off, f"toy numbers off the card's expected ones (recorded, expected): {off}"
    assert toy["pruned"]["asr"] >= toy["dense"]["asr"] + 15 and rec["toy_rsr"]["hsr"] >= 30
    assert toy["hsr"]["asr"] < toy["random_heads"]["asr"]
    assert rec["seed_table_rows"] >= 8
    text = outputs_text(run_dir / "notebooks" / "05_realign.ipynb")
    assert "Sorry, I cannot help with that." in text  # the toy's refusal, in the answers table
    real = read_records(run_dir / "notebooks" / "05_realign.ipynb")
    assert len(real["heads"]) == 2 and real["restored"] > 0


@pytest.mark.parametrize("which", ["toy_run", "tiny_run"])
def test_executed_notebooks_and_console_are_clean(which, request):
    """No line mentioning a warning or a deprecation in any executed notebook or in `hsr run`'s
    console, and a progress bar saved only in its final state (issue 21, clean outputs)."""
    from test_notebook_hygiene import outputs, progress_problems, warning_lines

    run_dir, proc = request.getfixturevalue(which)
    executed = sorted((run_dir / "notebooks").glob("0*.ipynb"))
    assert [p.stem for p in executed] == NOTEBOOKS
    for path in executed:
        text = outputs(path)
        assert not warning_lines(text), (path.name, warning_lines(text))
        assert not progress_problems(text), (path.name, progress_problems(text)[:3])
    console = proc.stdout + proc.stderr
    assert not warning_lines(console), warning_lines(console)


def test_evaluate_notebook_on_any_subset_of_the_toy(toy_run, tmp_path):
    """Notebook 06 on one harmful toy set and two variants (no dense, no benign set): it runs, from the
    answers already saved, and says what it cannot show instead of failing."""
    shutil.copytree(toy_run[0], tmp_path / "toy")
    proc = _hsr("run", "params/toy.yaml", "-p", f"runs_dir={tmp_path}", "-p", "eval.benchmarks=[toy_unsafe_image]",
                "-p", "eval.variants=[pruned,hsr]", "--from", "06", "--to", "06")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "toy" / "notebooks" / "06_evaluate.ipynb"
    rec, text = read_records(out), outputs_text(out)
    assert [r["variant"] for r in rec["beside_paper"] if r["source"] == "this run"] == ["pruned", "hsr"]
    assert rec["toy_rsr"] == {} and "not computed (the run evaluates no dense and pruned pair)" in text
    assert "evaluates no benign inputs" in text and "benign set is not evaluated" in text
    assert [r["comparison"] for r in rec["significance"]] == ["hsr vs pruned"]
    assert "teaching toy" in text and "random weights" not in text
