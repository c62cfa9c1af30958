"""Notebook 02, executed by `hsr run params/tiny.yaml`: its recorded values are the Ships
artifacts, the top heads follow from them, and the released scores are shown correctly."""

import json

import pytest

from hsr_lib.io import read_json
from hsr_lib.notebook import read_records
from hsr_lib.ships import head_key, load_head_scores, select_heads


@pytest.fixture(scope="module")
def rec(tiny_run):
    run_dir, _ = tiny_run
    return read_records(run_dir / "notebooks" / "02_ships.ipynb")


def test_recorded_scores_are_the_saved_artifact(tiny_run, rec):
    run_dir, _ = tiny_run
    saved = load_head_scores(run_dir / "ships" / "head_scores.json")
    assert rec["head_scores"] == pytest.approx(saved, rel=1e-12)
    assert len(saved) == 4 * 4 and rec["ships_score"] == "subspace" and rec["n_prompts"] == 16
    every = read_json(run_dir / "ships" / "head_scores_all.json")
    assert every["subspace"] == pytest.approx(saved, rel=1e-12)
    assert rec["total"]["kl"] == pytest.approx(sum(every["kl"].values()), rel=1e-12)
    assert all(v > 0 for v in saved.values())  # ε-ablation moves every head's representation


def test_top_heads_follow_from_the_scores(rec):
    assert rec["top_heads"] == [head_key(*h) for h in select_heads(rec["head_scores"], 4)]


def test_released_scores_top10(rec):
    assert rec["released_top10"]["llava-next-vicuna-7b"] == [
        "0-3", "0-21", "0-15", "16-17", "15-17", "31-22", "13-15", "31-4", "11-28", "1-8"]
    assert rec["released_top10"]["llama3-llava-next-8b"][:4] == ["2-6", "2-4", "2-7", "2-5"]


def test_step_artifacts(tiny_run):
    run_dir, _ = tiny_run
    d = run_dir / "ships"
    for name in ("head_scores.json", "head_scores.csv", "heatmap.png", "summary.json", "_step.json"):
        assert (d / name).is_file(), name
    assert len(list((d / "layers").glob("layer_*.json"))) == 4
    assert (d / "head_scores.json").read_text().count("\n") == 1  # the authors' one-line format
    json.loads((d / "head_scores.json").read_text())
