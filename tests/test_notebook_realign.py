"""Notebook 05, executed by `hsr run params/tiny.yaml`: its recorded values follow from the
realignment artifacts."""

import pandas as pd
import pytest

from hsr_lib.io import read_json
from hsr_lib.notebook import read_records
from hsr_lib.ships import head_key, load_head_scores, select_heads


@pytest.fixture(scope="module")
def rec(tiny_run):
    run_dir, _ = tiny_run
    return read_records(run_dir / "notebooks" / "05_realign.ipynb")


def test_records_match_the_artifacts(tiny_run, rec):
    run_dir, _ = tiny_run
    summary = read_json(run_dir / "realign" / "summary.json")
    mods = pd.read_csv(run_dir / "realign" / "modules.csv")
    assert rec["restored"] == summary["restored"] == int(mods.restored.sum()) > 0
    assert rec["restored_ratio_permyriad"] == pytest.approx(rec["restored"] / rec["decoder_linear_params"] * 1e4)
    # the tiny default: 4 layers × 7 linears of a 64-wide, 4-head/2-KV model
    assert rec["decoder_linear_params"] == 4 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128)


def test_heads_are_the_ships_top_h(tiny_run, rec):
    run_dir, _ = tiny_run
    scores = load_head_scores(run_dir / "ships" / "head_scores.json")
    assert rec["heads"] == [head_key(*h) for h in select_heads(scores, 4)]
    assert set(rec["restored_per_head"]) == set(rec["heads"])


def test_evaluation_sees_all_three_variants(tiny_run, rec):
    run_dir, _ = tiny_run
    ev = read_records(run_dir / "notebooks" / "06_evaluate.ipynb")
    assert ev["variants_evaluated"] == ["dense", "pruned", "realigned"]
    rows = {r["variant"]: r for r in ev["results_table"]}
    assert rows["realigned"]["restored_ratio_permyriad"] == pytest.approx(rec["restored_ratio_permyriad"])
    assert rows["pruned"]["hsr"] is False and rows["realigned"]["hsr"] is True
