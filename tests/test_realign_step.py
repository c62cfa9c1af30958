"""The realignment step on a copy of the shared tiny run (GQA: 4 heads, 2 KV heads): invariants,
variants, both fidelity modes, what the counts mean, rebuilding and saving the realigned model."""

from __future__ import annotations

import pytest
import torch

from hsr_lib import steps
from hsr_lib.models import load_from_params, load_model
from hsr_lib.params import load_params
from hsr_lib.sparsity import prune_mask
from hsr_lib.runs import Run
from conftest import LIB_OVERRIDES, TINY


def _weights(lm):
    return {k: v.weight.detach().clone() for k, v in lm.prunable_linears().items()}


def _R(res, dense):
    idx = res.restored()
    out = {}
    for name, W in dense.items():
        r = torch.zeros(W.numel(), dtype=torch.bool)
        if name in idx:
            r[idx[name]] = True
        out[name] = r.view(W.shape)
    return out


def test_invariants(run_copy):
    run = run_copy()
    res = steps.realign.load(run)
    summary = res.summary
    dense, pruned, real = (_weights(m) for m in (load_from_params(run.params), res.pruned.build(), res.build()))
    P, after, R = res.pruned.mask(), res.mask(), _R(res, dense)
    for name in dense:
        assert not (R[name] & ~P[name]).any(), name  # R ⊆ P (paper mode: the actual mask)
        assert torch.equal(real[name][R[name]], dense[name][R[name]]), name  # restored = dense values
        assert torch.equal(real[name][~R[name]], pruned[name][~R[name]]), name  # everything else unchanged
        assert torch.equal(after[name], P[name] & ~R[name]), name
        assert int((pruned[name] == 0).sum()) - int((real[name] == 0).sum()) == int(R[name].sum())
        if name.split(".")[-1] not in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert not R[name].any(), name  # MLP linears are never restored
    total = sum(int(r.sum()) for r in R.values())
    assert total == summary["restored"] == summary["newly_nonzero"] > 0
    assert summary["survivors_overwritten"] == summary["survivors_changed"] == 0
    n = sum(v.numel() for v in dense.values())
    assert summary["restored_ratio_permyriad"] == pytest.approx(total / n * 1e4)
    assert {int(k.split(".")[1]) for k in res.restored()} <= {int(h.split("-")[0]) for h in summary["heads"]}


def test_p_equal_p_max_restores_nothing(run_copy):
    assert steps.realign.run(run_copy(**{"realign.p": 0.6, "realign.p_max": 0.6}), progress=False).summary[
        "restored"] == 0


def test_hsr_a_restores_the_whole_region(run_copy):
    hsr = steps.realign.load(run_copy())
    res = steps.realign.run(run_copy(**{"realign.variant": "hsr_a"}), progress=False)
    mods = res.modules()
    assert (mods.restored == mods.pruned_in_region).all()
    assert res.summary["restored"] > hsr.summary["restored"] and res.summary["heads"] == hsr.summary["heads"]


def test_heads_table_counts_each_restored_weight_once(run_copy):
    """Under GQA the k/v rows a KV group shares are one unit, not one per head (paper mode)."""
    res = steps.realign.run(run_copy(**{"realign.variant": "hsr_a", "realign.top_h": 4}), progress=False)
    heads = res.heads()
    assert int(heads.total.sum()) == res.summary["restored"]
    kv = heads[heads.unit == "kv_group"]
    assert (kv.q_proj == 0).all() and (kv.o_proj == 0).all() and (kv.k_proj + kv.v_proj > 0).all()
    own = heads[heads.unit == "head"]
    assert (own.k_proj == 0).all() and (own.v_proj == 0).all()
    groups = {(r.layer, r.index): r.heads.split() for r in kv.itertuples()}
    assert any(len(h) == 2 for h in groups.values())  # the top 4 heads share a KV group somewhere


def _check_rederived(run, res, dense):
    """Reference mode: P re-derived from the dense U with the run's pattern in every module, saved;
    the realigned mask is P \\ R everywhere; the model is the dense one with P \\ R zeroed."""
    U = steps.scores.load(run).load("utility")
    P, mask, R = res.base_mask(), res.mask(), _R(res, dense)
    assert set(P) == set(mask) == set(U) == set(dense)
    for k in U:
        assert torch.equal(P[k], prune_mask(U[k].float(), run.params.pruning.sparsity, run.params.pruning.pattern)), k
        assert torch.equal(mask[k], P[k] & ~R[k]) if k in R else torch.equal(mask[k], P[k]), k
    real = _weights(res.build())
    assert all(torch.equal(real[k], dense[k].masked_fill(mask[k], 0)) for k in dense)


def test_reference_mode_counts_against_the_region_used(run_copy):
    run = run_copy(fidelity="reference", **{"realign.region": "reference", "realign.base_mask": "rederived"})
    res = steps.realign.run(run, progress=False)
    s = res.summary
    heads, mods = res.heads(), res.modules()
    assert int(heads.total.sum()) == s["restored"] == int(mods.restored.sum())
    assert set(heads[heads.unit == "layer"].columns) >= {"o_proj"}
    assert (heads[heads.unit == "layer"][["q_proj", "k_proj", "v_proj"]] == 0).all().all()
    assert (mods.restored <= mods.F).all()
    # what the ‱ counts: |R| against the re-derived P; newly non-zero against the actual mask
    dense = _weights(load_from_params(res.pruned.params))
    R, actual = _R(res, dense), res.pruned.mask()
    assert s["newly_nonzero"] == sum(int((R[k] & actual[k]).sum()) for k in R)
    assert s["survivors_overwritten"] == sum(int((R[k] & ~actual[k]).sum()) for k in R)
    assert s["restored"] == s["newly_nonzero"] + s["survivors_overwritten"]
    assert s["survivors_changed"] == 0  # Wanda's survivors keep their dense values
    _check_rederived(run, res, dense)


def test_reference_mode_after_sparsegpt_counts_changed_survivors(run_copy):
    run = run_copy(fidelity="reference", **{"realign.region": "reference", "realign.base_mask": "rederived",
                                            "pruning.method": "sparsegpt", "pruning.pattern": "2:4"})
    res = steps.realign.run(run, progress=False)
    s = res.summary
    dense = _weights(load_from_params(run.params))
    pruned, R, actual = _weights(res.pruned.build()), _R(res, dense), res.pruned.mask()
    survivors = {k: R[k] & ~actual[k] for k in R}
    changed = sum(int((pruned[k][survivors[k]] != dense[k][survivors[k]]).sum()) for k in R)
    assert s["survivors_overwritten"] > 0 and s["survivors_changed"] == changed > 0
    assert all((v.view(v.shape[0], -1, 4).sum(-1) == 2).all() for v in res.base_mask().values())  # P is 2:4
    _check_rederived(run, res, dense)  # built as the released code builds it: dense weights, P \\ R zeroed


def _fresh_run(tmp_path, name, seed):
    P = load_params(TINY, {"runs_dir": str(tmp_path / name), **LIB_OVERRIDES, "realign.variant": "random_heads",
                           "realign.seed": seed, "data.n_scores": 2})
    return Run.open(P)


def test_random_heads_are_seeded(tmp_path):
    """One seed gives the same heads in two fresh run directories; two seeds give different ones."""
    a = steps.realign.run(_fresh_run(tmp_path, "a", 3), progress=False).summary["heads"]
    b = steps.realign.run(_fresh_run(tmp_path, "b", 3), progress=False).summary["heads"]
    c = steps.realign.run(_fresh_run(tmp_path, "c", 4), progress=False).summary["heads"]
    assert a == b and a != c and len(a) == len(c) == 4
    assert not (tmp_path / "a" / "tiny" / "ships").exists()  # random heads need no Ships


def test_saved_model_reloads_with_identical_logits(run_copy, tmp_path, synthetic_vlguard):
    from hsr_lib.prompts import encode_prompt

    res = steps.realign.load(run_copy())
    path = res.save_model(tmp_path / "realigned")
    lm_a, lm_b = res.build(), load_model(str(path))
    enc = encode_prompt(lm_a.processor, synthetic_vlguard[2]["safety"][0])
    with torch.no_grad():
        assert torch.equal(lm_a.model(**enc).logits, lm_b.model(**enc).logits)


def test_save_model_is_part_of_the_realign_step(run_copy, monkeypatch):
    """It used to be saved after the step was marked done: a crash while saving left a finished
    step without its model, which no re-run repaired."""
    from conftest import check_save_model_in_step

    res = check_save_model_in_step(steps.realign, run_copy(**{"realign.save_model": True, "realign.q": 0.4}),
                                   monkeypatch)
    assert load_model(str(res.dir / "model")).family == "qwen2_5_vl"
