"""The HSR set operation and head regions on hand-made matrices (docs/method.md)."""

import pytest
import torch

from hsr_lib.adapters import Geometry
from hsr_lib.realign import (head_region, hsr_candidates, random_heads, rederived_mask, restore_set,
                             top_fraction)

T, F_ = True, False
GQA = Geometry(n_layers=2, n_heads=4, n_kv_heads=2, head_dim=2, hidden_size=8)
MHA = Geometry(n_layers=2, n_heads=4, n_kv_heads=4, head_dim=2, hidden_size=8)


def B(rows):
    return torch.tensor(rows, dtype=torch.bool)


def test_top_fraction_by_hand_with_ties():
    X = torch.tensor([[5.0, 1.0], [3.0, 3.0]])
    assert torch.equal(top_fraction(X, 0.5), B([[T, F_], [T, F_]]))  # the tie at 3 goes to flat index 2
    assert torch.equal(top_fraction(X, 0.75), B([[T, F_], [T, T]]))
    assert torch.equal(top_fraction(X, 0.0), B([[F_, F_], [F_, F_]]))
    assert torch.equal(top_fraction(X, 1.0), B([[T, T], [T, T]]))
    assert int(top_fraction(torch.zeros(7, 3), 0.5).sum()) == int(0.5 * 21)  # all tied
    with pytest.raises(ValueError):
        top_fraction(X, 1.5)


def test_top_fraction_equals_a_stable_sort():
    g = torch.Generator().manual_seed(0)
    X = torch.randint(0, 5, (13, 17), generator=g).float()  # many ties
    for f in (0.1, 0.35, 0.5, 0.7, 0.99):
        k = int(f * X.numel())
        idx = torch.sort(X.reshape(-1), descending=True, stable=True).indices[:k]
        want = torch.zeros(X.numel(), dtype=torch.bool)
        want[idx] = True
        assert torch.equal(top_fraction(X, f), want.view(X.shape)), f


def test_candidates_by_hand():
    # 2×4 matrix, n = 8. U ranks (high→low): idx 0,1,2,...,7; S ranks: idx 7,6,...,0.
    U = torch.arange(8, 0, -1).float().view(2, 4)
    S = torch.arange(1, 9).float().view(2, 4)
    # T(U,0.5) = {0,1,2,3}; T(U,0.75) = {0..5}; T(S,0.5) = {4,5,6,7}
    # F = {4,5,6,7} ∩ {0..5} \ {0..3} = {4,5}
    assert torch.equal(hsr_candidates(S, U, p=0.5, q=0.5, p_max=0.75), B([[F_, F_, F_, F_], [T, T, F_, F_]]))
    assert not hsr_candidates(S, U, p=0.5, q=0.5, p_max=0.5).any()  # p = p_max: nothing
    assert not hsr_candidates(S, U, p=0.5, q=0.1, p_max=0.75).any()  # int(0.1·8) = 0 safety entries
    with pytest.raises(ValueError):
        hsr_candidates(S, U, p=0.8, q=0.5, p_max=0.7)


def test_paper_region_gqa():
    q = head_region("q_proj", (8, 8), GQA, [1])
    assert q[2:4].all() and q.sum() == 2 * 8
    k = head_region("k_proj", (4, 8), GQA, [1])  # head 1 reads KV head 0: rows 0:2
    assert k[0:2].all() and k.sum() == 2 * 8
    v = head_region("v_proj", (4, 8), GQA, [2, 3])  # both read KV head 1
    assert v[2:4].all() and v.sum() == 2 * 8
    o = head_region("o_proj", (8, 8), GQA, [1, 3])
    assert o[:, 2:4].all() and o[:, 6:8].all() and o.sum() == 2 * 2 * 8
    assert not head_region("gate_proj", (16, 8), GQA, [1]).any()
    assert not head_region("q_proj", (8, 8), GQA, []).any()


def test_paper_region_mha():
    k = head_region("k_proj", (8, 8), MHA, [3])
    assert k[6:8].all() and k.sum() == 16


def test_reference_region_gqa():
    q = head_region("q_proj", (8, 8), GQA, [1], mode="reference")  # input columns [1·2, 2·2)
    assert q[:, 2:4].all() and q.sum() == 8 * 2
    k = head_region("k_proj", (4, 8), GQA, [3], mode="reference")  # group 1, width in/H_kv = 4
    assert k[:, 4:8].all() and k.sum() == 4 * 4
    assert head_region("o_proj", (8, 8), GQA, [0], mode="reference").all()
    assert not head_region("o_proj", (8, 8), GQA, [], mode="reference").any()
    with pytest.raises(ValueError):
        head_region("q_proj", (8, 8), GQA, [0], mode="nope")


def test_rederived_mask_by_hand():
    U = torch.tensor([[3.0, 1.0, 2.0, 1.0], [0.0, 5.0, 4.0, 6.0]])
    # s = 0.5: 2 lowest per row; row 0 has a tie at 1.0 (indices 1 and 3 both lowest)
    assert torch.equal(rederived_mask(U, 0.5), B([[F_, T, F_, T], [T, F_, T, F_]]))
    assert torch.equal(rederived_mask(U, 0.25), B([[F_, T, F_, F_], [T, F_, F_, F_]]))  # stable: index 1 first
    assert not rederived_mask(U, 0.0).any()


def test_restore_set_invariants_and_variants():
    g = torch.Generator().manual_seed(1)
    S, U = torch.rand(8, 8, generator=g), torch.rand(8, 8, generator=g)
    P = rederived_mask(U, 0.5)
    region = head_region("q_proj", (8, 8), GQA, [0, 2])
    R = restore_set(P, S, U, region, "hsr", p=0.5, q=0.5, p_max=0.7)
    assert not (R & ~P).any() and not (R & ~region).any()  # R ⊆ P ∩ region
    assert torch.equal(R, P & region & hsr_candidates(S, U, 0.5, 0.5, 0.7))
    assert torch.equal(restore_set(P, S, U, region, "hsr_a", 0.5, 0.5, 0.7), P & region)
    assert not restore_set(P, S, U, region, "hsr", 0.5, 0.5, 0.5).any()
    with pytest.raises(ValueError):
        restore_set(P, S, U, region, "whole", 0.5, 0.5, 0.7)


def test_random_heads_seeded():
    a, b = random_heads(GQA, 3, seed=7), random_heads(GQA, 3, seed=7)
    assert a == b and len(set(a)) == 3 and a == sorted(a)
    assert all(0 <= l < 2 and 0 <= h < 4 for l, h in a)
    assert random_heads(GQA, 3, seed=8) != a or random_heads(GQA, 3, seed=9) != a


def _stable_top(X, f):
    """The naive reference: the first int(f·n) entries of a stable descending sort."""
    k = int(f * X.numel())
    want = torch.zeros(X.numel(), dtype=torch.bool)
    want[torch.sort(X.reshape(-1).float(), descending=True, stable=True).indices[:k]] = True
    return want.view(X.shape)


def test_fast_selection_on_large_matrices_equals_a_stable_sort():
    """Above 4 × 65,536 entries T(X, f) brackets its threshold from a sample: exact all the same,
    also on scores full of ties (bf16-rounded, or all equal)."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(600, 700, generator=g).abs()
    cases = {"float": X, "bf16 ties": X.bfloat16().float(), "coarse ties": (X * 4).round(), "all equal": X * 0 + 1}
    for name, M in cases.items():
        for f in (0.0035, 0.2, 0.5, 0.7, 0.9):
            assert torch.equal(top_fraction(M, f), _stable_top(M, f)), (name, f)


def test_fast_selection_falls_back_when_the_sample_misses(monkeypatch):
    import hsr_lib.realign as R

    X = torch.randn(600, 700, generator=torch.Generator().manual_seed(2))
    low = torch.argsort(X.reshape(-1))[: R.SAMPLE]  # a sample of the smallest entries only: the bracket misses
    monkeypatch.setattr(torch, "randint", lambda n, size, generator=None: low)
    assert torch.equal(top_fraction(X, 0.3), _stable_top(X, 0.3))


def _model(seed=0):
    """Masks and scores of a 2-layer GQA model: q/k/v/o and one MLP linear per layer."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"q_proj": (8, 8), "k_proj": (4, 8), "v_proj": (4, 8), "o_proj": (8, 8), "up_proj": (16, 8)}
    names = [f"layers.{i}.{'mlp' if k == 'up_proj' else 'self_attn'}.{k}" for i in range(2) for k in shapes]
    S = {n: torch.rand(shapes[n.rsplit('.', 1)[1]], generator=g) for n in names}
    U = {n: torch.rand(shapes[n.rsplit('.', 1)[1]], generator=g) for n in names}
    P = {n: rederived_mask(torch.rand(U[n].shape, generator=g), 0.5) for n in names}  # not U's own mask
    return P, S, U


@pytest.mark.parametrize("variant,region", [("hsr", "paper"), ("hsr_a", "paper"), ("hsr", "reference")])
def test_realign_model_is_restore_set_on_every_matrix(variant, region):
    """The model-level function against the naive loop over matrices with the one-matrix functions."""
    from hsr_lib.realign import module_kind, realign_model

    P, S, U = _model()
    heads = [(0, 1), (0, 2), (1, 3)]
    out = realign_model(P, S, U, heads, GQA, variant=variant, p=0.3, q=0.5, p_max=0.8, region=region)
    touched = [n for n in P if module_kind(n) != "up_proj"]
    assert sorted(out.masks) == sorted(touched) and len(out.modules) == len(touched)
    for n in touched:
        layer = int(n.split(".")[1])
        reg = head_region(module_kind(n), tuple(S[n].shape), GQA, [h for lay, h in heads if lay == layer], region)
        R = restore_set(P[n], S[n], U[n], reg, variant, 0.3, 0.5, 0.8)
        assert torch.equal(out.restored[n], R) and torch.equal(out.masks[n], P[n] & ~R), n
    rows = {r["module"]: r for r in out.modules}
    assert sum(r["restored"] for r in rows.values()) == sum(int(r.sum()) for r in out.restored.values()) > 0
    assert sum(u["restored"] for u in out.units) == out.totals(1000)["restored"]  # the units partition R
    assert out.totals(1000)["restored_ratio_permyriad"] == pytest.approx(out.totals(1000)["restored"] * 10)


def test_realign_model_rederived_base_covers_every_module():
    from hsr_lib.realign import realign_model

    P, S, U = _model(1)
    out = realign_model(P, S, U, [(1, 0)], GQA, p=0.3, q=0.5, p_max=0.8, base_mask="rederived", sparsity=0.5)
    assert sorted(out.base) == sorted(P)  # P re-derived from U everywhere, the MLP and layer 0 too
    for n in P:
        assert torch.equal(out.base[n], rederived_mask(U[n], 0.5)), n
        assert torch.equal(out.masks[n], out.base[n] & ~out.restored.get(n, torch.zeros_like(P[n]))), n
    assert set(out.restored) == {n for n in P if n.startswith("layers.1.self_attn")}
    row = out.modules[0]  # R is taken against the re-derived P; newly non-zero against the actual mask
    R = out.restored[row["module"]]
    assert row["newly_nonzero"] == int((R & P[row["module"]]).sum())
    assert row["survivors_overwritten"] == int((R & ~P[row["module"]]).sum())


@pytest.mark.parametrize("kwargs,needle", [
    ({"variant": "whole"}, "realign variant 'whole'"), ({"region": "rows"}, "region mode 'rows'"),
    ({"base_mask": "dense"}, "base_mask 'dense'"), ({"p": 0.8, "p_max": 0.7}, "p ≤ p_max"),
    ({"q": 1.5}, "q=1.5"), ({"base_mask": "rederived"}, "give its sparsity"),
    ({"base_mask": "rederived", "sparsity": 1.2}, "sparsity must be in"), ({"heads": [(5, 0)]}, "head 5-0"),
])
def test_realign_model_names_each_bad_setting(kwargs, needle):
    from hsr_lib.realign import realign_model

    P, S, U = _model()
    heads = kwargs.pop("heads", [(0, 0)])
    with pytest.raises(ValueError, match=needle):
        realign_model(P, S, U, heads, GQA, **kwargs)


def test_a_rule_is_checked_once_then_passed_down(monkeypatch):
    """Each value is checked once per public entry point: a checked Rule is not checked again below it."""
    import hsr_lib.sparsity as sp
    from hsr_lib.sparsegpt import sparsegpt_prune

    calls = []
    real = sp.check_sparsity
    monkeypatch.setattr(sp, "check_sparsity", lambda *a: calls.append(a) or real(*a))
    r = sp.rule(0.5, "2:4")
    X = torch.rand(4, 8)
    assert torch.equal(sp.prune_mask(X, r), sp.prune_mask(X, 0.5, "2:4")) and len(calls) == 2
    W, A = torch.rand(4, 8), torch.rand(16, 8)
    sparsegpt_prune(W, A.T @ A, r, blocksize=4)
    realign_rederived = rederived_mask(X, r)
    assert len(calls) == 2 and realign_rederived.sum() == 16
    with pytest.raises(ValueError, match="divisible by 4"):
        r.mask(torch.rand(4, 6))
