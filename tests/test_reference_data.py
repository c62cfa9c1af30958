"""The vendored reference data equals the shared originals, and the authors' head scores read
back as their README describes."""

from pathlib import Path

import pytest

from hsr_lib.ships import head_key, load_head_scores, select_heads
from hsr_lib.reference import AUTHORS_SCORES, REFERENCE_DATA, authors_scores, claim, paper_table

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not beside this checkout")
def test_vendored_copy_equals_shared():
    shared = sorted(p.relative_to(SHARED) for p in SHARED.rglob("*") if p.is_file())
    assert shared, "no shared data found"
    for rel in shared:
        assert (REFERENCE_DATA / rel).read_bytes() == (SHARED / rel).read_bytes(), rel


def test_authors_vicuna_scores_match_their_readme():
    s = load_head_scores(AUTHORS_SCORES["llava-next-vicuna-7b"])
    assert len(s) == 32 * 32 and round(sum(s.values()), 2) == 2048.30
    top = [head_key(*h) for h in select_heads(s, 10)]
    assert top == ["0-3", "0-21", "0-15", "16-17", "15-17", "31-22", "13-15", "31-4", "11-28", "1-8"]


def test_authors_llama3_scores_match_their_readme():
    s = load_head_scores(AUTHORS_SCORES["llama3-llava-next-8b"])
    assert len(s) == 32 * 32 and round(sum(s.values()), 2) == 7624.10
    assert [head_key(*h) for h in select_heads(s, 4)] == ["2-6", "2-4", "2-7", "2-5"]


def test_paper_tables_and_claims_read_back():
    assert claim("spearman_total_ships_vs_safety_degradation_six_models") == 0.8857
    assert claim("helpful_top_fraction_of_safety_neurons") == 0.35
    main = paper_table("main")
    assert {"full", "wanda", "sparsegpt", "snip"} <= set(main["method"])
    assert authors_scores("llava-next-vicuna-7b") == load_head_scores(AUTHORS_SCORES["llava-next-vicuna-7b"])
    with pytest.raises(KeyError, match="nope"):
        paper_table("nope")
    with pytest.raises(KeyError, match="nope"):
        claim("nope")
