"""The scores and prune steps of a run: artifacts, reuse, rebuilding the pruned model."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from safetensors import safe_open

from hsr_lib.masks import mask_metadata
from hsr_lib.models import load_from_params, load_model
from hsr_lib.params import load_params
from hsr_lib.prune import build_pruned, heldout_utility, load_mask, load_pruned_weights, prune_step, save_pruned
from hsr_lib.runs import Run
from hsr_lib.scores import load_scores, score_step


def make_run(tmp_path, **over) -> Run:
    base = {"runs_dir": str(tmp_path), "model.name": "tiny:qwen2_5_vl", "model.device": "cpu",
            "model.dtype": "float32", "data.n_synthetic": 8, "data.n_ships": 2, "data.n_scores": 2}
    return Run.open(load_params(overrides={**base, **over}))


def test_score_step_writes_one_tensor_per_module_and_is_reused(tmp_path):
    run = make_run(tmp_path, **{"scores.methods": ["snip"]})
    summary = score_step(run, progress=False)
    assert summary["methods"] == ["wanda", "snip"] and summary["sets"]["safety"]["n_samples"] == 2
    names = load_from_params(run.params).adapter.prunable_names(load_from_params(run.params).model.config)
    for which in ("safety", "utility"):
        for method in ("wanda", "snip"):
            path = run.step_dir("scores") / f"{method}_{which}.safetensors"
            with safe_open(str(path), framework="pt") as f:
                assert sorted(f.keys()) == sorted(names) and f.metadata()["set"] == which
    S, U = load_scores(run, "safety"), load_scores(run, "utility")
    assert set(S) == set(U) == set(names) and S[names[0]].dtype == torch.float32
    assert not torch.equal(S[names[0]], U[names[0]])
    assert set(load_scores(run, "utility", "snip", keys=names[:2])) == set(names[:2])
    marker = (run.step_dir("scores") / "_step.json").read_text()
    assert score_step(run, progress=False) == summary
    assert (run.step_dir("scores") / "_step.json").read_text() == marker
    with pytest.raises(FileNotFoundError, match="sparsegpt"):
        load_scores(run, "safety", "sparsegpt")


@pytest.mark.parametrize("method,pattern", [("wanda", "unstructured"), ("sparsegpt", "2:4")])
def test_prune_step_artifacts_rebuild_the_pruned_model(tmp_path, method, pattern):
    run = make_run(tmp_path, **{"pruning.method": method, "pruning.pattern": pattern, "pruning.sparsity": 0.5,
                                "pruning.save_model": True})
    lm = load_from_params(run.params)
    summary = prune_step(run, lm, progress=False)
    assert summary["sparsity_reached"] == 0.5 and summary["method"] == method
    d = run.step_dir("prune")
    with safe_open(str(d / "mask.safetensors"), framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.uint8 for k in f.keys())
    assert mask_metadata(d / "mask.safetensors")["true_means"] == "pruned"
    P = load_mask(run)
    lins = lm.prunable_linears()
    assert set(P) == set(lins) and all(P[k].dtype == torch.bool and (lins[k].weight[P[k]] == 0).all() for k in P)
    assert bool(load_pruned_weights(run)) == (method == "sparsegpt")
    rebuilt = build_pruned(run)
    pruned_state = lm.model.state_dict()
    assert all(torch.equal(v, pruned_state[k]) for k, v in rebuilt.model.state_dict().items())
    report = pd.read_csv(d / "sparsity.csv")
    assert set(report.level) == {"module", "layer", "total"}
    assert (report.level == "module").sum() == len(lins) and (report.level == "layer").sum() == 4
    assert (report.sparsity == 0.5).all() and (report.pruned == report.zeros).all()
    saved = load_model(str(d / "model"), dtype="float32", device="cpu")
    assert all(torch.equal(v, pruned_state[k]) for k, v in saved.model.state_dict().items())
    other = save_pruned(run, tmp_path / "elsewhere")
    assert (other / "config.json").exists()
    marker = (d / "_step.json").read_text()
    assert prune_step(run, progress=False) == summary and (d / "_step.json").read_text() == marker


def test_build_pruned_needs_the_artifacts_and_the_same_model(tmp_path):
    run = make_run(tmp_path)
    with pytest.raises(FileNotFoundError, match="prune step"):
        build_pruned(run)
    prune_step(run, progress=False)
    other = Run(load_params(overrides={**run.params.to_dict(), "model": {**run.params.to_dict()["model"],
                                                                         "name": "tiny:qwen2_vl"}}), run.dir)
    with pytest.raises(ValueError, match="tiny:qwen2_5_vl"):
        build_pruned(other)
    held = heldout_utility(run, 8)
    used = set(pd.read_json(run.step_dir("prune") / "summary.json", typ="series")["ids"])
    assert held and not used & {s.id for s in held}
