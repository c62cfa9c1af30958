"""On a complete run: a change recomputes only what depends on it, settings coexist, and a step
whose upstream is missing computes it (with a line naming it) or refuses (naming it)."""

from __future__ import annotations

import pytest

from hsr_lib import steps
from hsr_lib.io import read_json


def markers(run_dir):
    """Every finished folder's marker text, by ``<step>/<key>``."""
    return {f"{p.parent.parent.name}/{p.parent.name}": p.read_text() for p in run_dir.glob("*/*/_step.json")}


def test_adding_snip_recomputes_only_the_scores_step(run_copy):
    run = run_copy()
    before = markers(run.dir)
    more = run_copy(**{"scores.methods": ["snip"]})
    for step in (steps.data, steps.ships, steps.scores, steps.prune, steps.realign, steps.evaluate):
        step.run(more, progress=False)
    after = markers(run.dir)
    new = set(after) - set(before)
    assert len(new) == 1 and new.pop().startswith("scores/snip-")
    assert all(after[k] == v for k, v in before.items())  # nothing else touched
    res = steps.scores.load(more)
    assert res.methods == ["wanda", "snip"] and set(res.load("safety", "snip")) == set(res.load("safety"))


def test_a_second_realignment_leaves_the_first_in_place(run_copy):
    run = run_copy()
    first = steps.realign.load(run)
    files = {p.name: p.read_bytes() for p in first.dir.iterdir() if p.is_file()}
    second = steps.realign.run(run_copy(**{"realign.q": 0.3}), progress=False)
    assert second.dir != first.dir and second.dir.name.startswith("hsr-p0.5-q0.3-pmax0.7-h4-")
    assert {p.name: p.read_bytes() for p in first.dir.iterdir() if p.is_file()} == files
    assert second.summary["restored"] <= first.summary["restored"]  # a smaller T(S, q)
    # and a second sparsity: its own pruning, Ships and scores reused
    before = markers(run.dir)
    third = steps.realign.run(run_copy(**{"pruning.sparsity": 0.6}), progress=False)
    new = sorted(set(markers(run.dir)) - set(before))
    assert [k.split("/")[0] for k in new] == ["prune", "realign"] and third.pruned.summary["sparsity"] == 0.6
    assert third.pruned.summary["sparsity_reached"] == pytest.approx(0.6, abs=0.01)  # int(in·s) per row


def test_missing_upstream_is_computed_with_a_line_or_refused(run_copy, capsys):
    run = run_copy(**{"pruning.sparsity": 0.6})
    with pytest.raises(steps.MissingUpstream, match="prune/wanda-0.6-unstructured-"):
        steps.realign.run(run, upstream="refuse", progress=False)
    assert not run.keys("realign") or all("0.6" not in k for k in run.keys("prune"))
    steps.realign.run(run, progress=False)
    out = capsys.readouterr().out
    assert "computing upstream step 'prune': prune/wanda-0.6-unstructured-" in out
    assert "'ships'" not in out and "'scores'" not in out  # those exist already


def test_changing_the_ships_score_recomputes_nothing_upstream(run_copy):
    run = run_copy()
    before = markers(run.dir)
    res = steps.ships.run(run_copy(**{"ships.score": "kl"}), progress=False)
    assert markers(run.dir) == before and res.score == "kl"
    assert res.scores == read_json(res.dir / "head_scores_all.json")["kl"]
