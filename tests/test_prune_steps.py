"""The scores and prune steps of a run: artifacts, reuse, rebuilding the pruned model, saving it."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from hsr_lib import steps
from hsr_lib.masks import mask_metadata
from hsr_lib.models import load_from_params, load_model
from hsr_lib.params import load_params
from hsr_lib.runs import Run
from hsr_lib.sparsity import pattern_label
from hsr_lib.views import heldout_samples


def make_run(tmp_path, **over) -> Run:
    base = {"runs_dir": str(tmp_path), "model.name": "tiny:qwen2_5_vl", "model.device": "cpu",
            "model.dtype": "float32", "data.n_synthetic": 8, "data.n_ships": 2, "data.n_scores": 2}
    return Run.open(load_params(overrides={**base, **over}))


def test_scores_step_writes_one_folder_per_method_and_is_reused(tmp_path):
    run = make_run(tmp_path, **{"scores.methods": ["snip"]})
    res = steps.scores.run(run, progress=False)
    assert res.methods == ["wanda", "snip"] and res.summary["sets"]["safety"]["n_samples"] == 2
    lm = load_from_params(run.params)
    names = lm.adapter.prunable_names(lm.model.config)
    for method in ("wanda", "snip"):
        assert res.dirs[method].name.startswith(f"{method}-")
        for which in ("safety", "utility"):
            with safe_open(str(res.path(which, method)), framework="pt") as f:
                assert sorted(f.keys()) == sorted(names) and f.metadata()["set"] == which
    S, U = res.load("safety"), res.load("utility")
    assert set(S) == set(U) == set(names) and S[names[0]].dtype == torch.float32
    assert not torch.equal(S[names[0]], U[names[0]])
    assert set(res.load("utility", "snip", keys=names[:2])) == set(names[:2])
    marker = (res.dir / "_step.json").read_text()
    assert steps.scores.run(run, progress=False).summary == res.summary
    assert (res.dir / "_step.json").read_text() == marker
    with pytest.raises(FileNotFoundError, match="sparsegpt"):
        res.load("safety", "sparsegpt")


@pytest.mark.parametrize("method,pattern", [("wanda", "unstructured"), ("sparsegpt", "2:4")])
def test_prune_step_artifacts_rebuild_the_pruned_model(tmp_path, method, pattern):
    run = make_run(tmp_path, **{"pruning.method": method, "pruning.pattern": pattern, "pruning.sparsity": 0.5,
                                "pruning.save_model": True})
    lm = load_from_params(run.params)
    res = steps.prune.run(run, progress=False, lm=lm)
    summary = res.summary
    assert summary["sparsity_reached"] == 0.5 and summary["method"] == method
    assert res.dir.name.startswith(f"{method}-0.5-{pattern_label(pattern)}-")
    with safe_open(str(res.mask_path), framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.uint8 for k in f.keys())
    assert mask_metadata(res.mask_path)["true_means"] == "pruned"
    P = res.mask()
    lins = lm.prunable_linears()
    assert set(P) == set(lins) and all(P[k].dtype == torch.bool and (lins[k].weight[P[k]] == 0).all() for k in P)
    assert bool(res.weights()) == (method == "sparsegpt")
    rebuilt = res.build()
    pruned_state = lm.model.state_dict()
    assert all(torch.equal(v, pruned_state[k]) for k, v in rebuilt.model.state_dict().items())
    report = res.sparsity()
    assert set(report.level) == {"module", "layer", "total"}
    assert (report.level == "module").sum() == len(lins) and (report.level == "layer").sum() == 4
    assert (report.sparsity == 0.5).all() and (report.pruned == report.zeros).all()
    saved = load_model(str(res.dir / "model"), dtype="float32", device="cpu")
    assert all(torch.equal(v, pruned_state[k]) for k, v in saved.model.state_dict().items())
    assert (res.save_model(tmp_path / "elsewhere") / "config.json").exists()
    marker = (res.dir / "_step.json").read_text()
    assert steps.prune.run(run, progress=False).summary == summary and (res.dir / "_step.json").read_text() == marker


def test_build_needs_the_artifacts_and_the_same_model(tmp_path):
    run = make_run(tmp_path)
    with pytest.raises(steps.StepNotDone, match="prune"):
        steps.prune.load(run)
    res = steps.prune.run(run, progress=False)
    res.model_name = "tiny:qwen2_vl"
    with pytest.raises(ValueError, match="tiny:qwen2_5_vl"):
        res.build()
    utility = steps.data.load(run).load("utility")
    held = heldout_samples(utility, res.summary["ids"], 8)
    assert held and not set(res.summary["ids"]) & {s.id for s in held}
    assert heldout_samples(utility, [s.id for s in utility], 8) == []  # every record calibrated: none held out


def test_save_model_is_part_of_the_prune_step(tmp_path, monkeypatch):
    from conftest import check_save_model_in_step

    res = check_save_model_in_step(steps.prune, make_run(tmp_path, **{"pruning.save_model": True}), monkeypatch)
    assert load_model(str(res.dir / "model")).family == "qwen2_5_vl"
