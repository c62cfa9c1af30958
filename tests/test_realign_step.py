"""The realignment step on a tiny run: invariants, variants, both fidelity modes, rebuilding and
saving the realigned model."""

from pathlib import Path

import pytest
import torch

from hsr_lib.io import read_json
from hsr_lib.models import load_from_params, load_model
from hsr_lib.params import load_params
from hsr_lib.prune import build_pruned, load_mask
from hsr_lib.realign_step import build_realigned, load_restored, realign_step, realigned_mask, save_realigned
from hsr_lib.runs import Run

TINY = Path(__file__).resolve().parent.parent / "params" / "tiny.yaml"
SMALL = ["data.n_ships=3", "data.n_scores=3", "model.name=tiny:llava_next_mistral"]  # GQA: 4 heads, 2 KV heads


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("realign_runs")


def open_run(runs_dir, *extra):
    return Run.open(load_params(TINY, [f"runs_dir={runs_dir}", *SMALL, *extra]))


@pytest.fixture(scope="module")
def hsr_run(runs_dir):
    run = open_run(runs_dir)
    return run, realign_step(run, progress=False)


def _weights(lm):
    return {k: v.weight.detach().clone() for k, v in lm.prunable_linears().items()}


def test_invariants(hsr_run):
    run, summary = hsr_run
    dense, pruned, real = (_weights(m) for m in (load_from_params(run.params), build_pruned(run), build_realigned(run)))
    P, after, idx = load_mask(run), realigned_mask(run), load_restored(run)
    total = 0
    for name in dense:
        R = torch.zeros(dense[name].numel(), dtype=torch.bool)
        if name in idx:
            R[idx[name]] = True
        R = R.view(dense[name].shape)
        total += int(R.sum())
        assert not (R & ~P[name]).any(), name  # R ⊆ P (paper mode: the actual mask)
        assert torch.equal(real[name][R], dense[name][R]), name  # restored = dense values
        assert torch.equal(real[name][~R], pruned[name][~R]), name  # everything else unchanged
        assert torch.equal(after[name], P[name] & ~R), name
        assert int((pruned[name] == 0).sum()) - int((real[name] == 0).sum()) == int(R.sum())  # sparsity drops by |R|
        if not name.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert not R.any(), name  # MLP linears are never restored
    assert total == summary["restored"] > 0
    n = sum(v.numel() for v in dense.values())
    assert summary["restored_ratio_permyriad"] == pytest.approx(total / n * 1e4)


def test_only_selected_head_layers_restore(hsr_run):
    run, summary = hsr_run
    layers = {int(h.split("-")[0]) for h in summary["heads"]}
    assert {int(k.split(".")[1]) for k in load_restored(run)} <= layers


def test_p_equal_p_max_restores_nothing(runs_dir):
    summary = realign_step(open_run(runs_dir, "realign.p=0.6", "realign.p_max=0.6"), progress=False)
    assert summary["restored"] == 0


def test_hsr_a_restores_the_whole_region(runs_dir, hsr_run):
    _, hsr = hsr_run
    run = open_run(runs_dir, "realign.variant=hsr_a")
    summary = realign_step(run, progress=False)
    import pandas as pd

    mods = pd.read_csv(run.step_dir("realign") / "modules.csv")
    assert (mods.restored == mods.pruned_in_region).all()
    assert summary["restored"] > hsr["restored"] and summary["heads"] == hsr["heads"]


def test_random_heads_are_seeded_and_differ(runs_dir, hsr_run):
    a = realign_step(open_run(runs_dir, "realign.variant=random_heads", "realign.seed=3"), progress=False)
    b = realign_step(open_run(runs_dir, "realign.variant=random_heads", "realign.seed=3"), progress=False)
    assert a["heads"] == b["heads"] and len(a["heads"]) == 4


def test_reference_mode_regions_and_rederived_mask(runs_dir):
    run = open_run(runs_dir, "fidelity=reference")
    summary = realign_step(run, progress=False)
    assert summary["region"] == "reference" and summary["base_mask"] == "rederived"
    import pandas as pd

    mods = pd.read_csv(run.step_dir("realign") / "modules.csv")
    assert (mods.restored <= mods.F).all()


def test_saved_model_reloads_with_identical_logits(hsr_run, tmp_path, synthetic_vlguard):
    from hsr_lib.prompts import encode_prompt

    run, _ = hsr_run
    path = save_realigned(run, tmp_path / "realigned")
    lm_a, lm_b = build_realigned(run), load_model(str(path))
    enc = encode_prompt(lm_a.processor, synthetic_vlguard[2]["safety"][0])
    with torch.no_grad():
        assert torch.equal(lm_a.model(**enc).logits, lm_b.model(**enc).logits)


def test_save_model_param_writes_a_loadable_directory(runs_dir):
    run = open_run(runs_dir, "realign.save_model=true", "realign.seed=11", "realign.variant=random_heads")
    realign_step(run, progress=False)
    lm = load_model(str(run.step_dir("realign") / "model"))
    assert lm.family == "llava_next"
