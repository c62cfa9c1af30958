"""Exercise 3's checks: the HSR set operation on one matrix: the T-sets, the utility band, the head
region and the restored set R = P ∩ T(S, q) ∩ (T(U, p_max) \\ T(U, p)) ∩ region.

Expected values come from the library (:mod:`hsr_lib.realign`: ``top_fraction``,
``hsr_candidates``, ``head_region``, ``restore_set``). A T-set is accepted when it is *a* correct
answer: ties between equal entries may go either way.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..adapters import Geometry
from ..realign import head_region, restore_set, top_fraction
from .feedback import as_mask, call, fail, first_index, passed

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj")


def _check_t_set(got: torch.Tensor, X: torch.Tensor, f: float, what: str) -> None:
    n = X.numel()
    k = int(f * n)
    c = int(got.sum())
    if c != k:
        why = ""
        if c == round(f * n) or c == -(-f * n // 1):
            why = f" You rounded f·n = {f * n:g} up; take int(f · n) = {k} (round down)."
        elif c == X.shape[0] * int(f * X.shape[1]) and c != k:
            why = " You took the top fraction of each row; T(X, f) ranks all entries of the matrix together."
        fail(f"{what}: {c} entries selected; expected int({f} · {n}) = {k}.{why}")
    sel, rest = X[got], X[~got]
    if len(sel) and len(rest) and sel.min() < rest.max():
        if torch.equal(got, top_fraction(-X, f)):
            fail(f"{what}: you selected the {k} smallest entries; T(X, f) holds the largest.")
        rows_top = torch.zeros_like(got)
        kr = int(f * X.shape[1])
        if kr:
            rows_top.scatter_(1, X.topk(kr, dim=1).indices, True)
        if torch.equal(got, rows_top):
            fail(f"{what}: you took the top fraction of each row; T(X, f) ranks all entries of the matrix together.")
        fail(f"{what}: you selected an entry of value {sel.min().item():.4g} but left out one of value "
             f"{rest.max().item():.4g}; T(X, f) holds the int(f·n) largest entries.")


def check_top_fraction(your_fn: Callable, X_toy: torch.Tensor | None = None) -> None:
    """``your_fn(X, f) -> bool mask``: the int(f·n) largest entries of X (the whole matrix)."""
    g = torch.Generator().manual_seed(0)
    cases = [(torch.rand(6, 8, generator=g), 0.5), (torch.rand(5, 7, generator=g), 0.3),
             (torch.rand(4, 10, generator=g), 0.25), (torch.rand(3, 3, generator=g), 0.0),
             (torch.rand(3, 4, generator=g), 1.0), (torch.randn(8, 6, generator=g), 0.35)]
    if X_toy is not None:
        cases += [(X_toy, 0.5), (X_toy, 0.2)]
    for X, f in cases:
        what = f"top_fraction on a {X.shape[0]}×{X.shape[1]} matrix, f = {f}"
        got = as_mask(call(your_fn, X.clone(), f, name="top_fraction"), "top_fraction", X)
        _check_t_set(got, X, f, what)
    passed(f"top_fraction right on {len(cases)} matrices")


GEOMETRIES = (Geometry(2, 4, 2, 16, 64), Geometry(2, 8, 2, 4, 32), Geometry(2, 4, 4, 8, 32), Geometry(2, 6, 1, 4, 24))


def _shape(kind: str, geo: Geometry) -> tuple[int, int]:
    d, hid = geo.head_dim, geo.hidden_size
    return {"q_proj": (geo.n_heads * d, hid), "k_proj": (geo.n_kv_heads * d, hid), "v_proj": (geo.n_kv_heads * d, hid),
            "o_proj": (hid, geo.n_heads * d), "gate_proj": (2 * hid, hid), "down_proj": (hid, 2 * hid)}[kind]


def _region_mistake(kind: str, got: torch.Tensor, geo: Geometry, heads: Sequence[int]) -> str:
    if kind in ("gate_proj", "up_proj", "down_proj"):
        return " MLP linears are never restored: their region is empty (all False)."
    d = geo.head_dim
    if kind == "o_proj":
        rows = torch.zeros_like(got)
        for h in heads:
            rows[h * d:(h + 1) * d, :] = True
        if torch.equal(got, rows):
            return (" You marked rows of o_proj. Head h's attention output is o_proj's *input*: mark the columns "
                    "h·d … (h+1)·d − 1, every row.")
    if kind in ("k_proj", "v_proj"):
        own = torch.zeros_like(got)
        for h in heads:
            own[h * d:(h + 1) * d, :] = True
        if torch.equal(got, own):
            return (f" You marked the rows of head h itself. {kind} has one block of rows per KV head: use KV head "
                    f"g = h // (n_heads / n_kv_heads) (group size {geo.group_size}).")
    if kind in ("q_proj", "k_proj", "v_proj"):
        cols = torch.zeros_like(got)
        for h in heads:
            cols[:, h * d:(h + 1) * d] = True
        if torch.equal(got, cols):
            return f" You marked columns of {kind}; a head owns output rows of {kind} (all their input columns)."
    return ""


def check_head_region(your_fn: Callable) -> None:
    """``your_fn(kind, shape, heads, n_heads, n_kv_heads, head_dim) -> bool [out, in]``: the weights of
    the query heads ``heads`` in one linear (``paper`` region), against the library's ``head_region``."""
    n = 0
    for geo in GEOMETRIES:
        for heads in ([1], [0, geo.n_heads - 1], []):
            for kind in KINDS:
                shape = _shape(kind, geo)
                want = head_region(kind, shape, geo, heads, "paper")
                got = as_mask(call(your_fn, kind, shape, list(heads), geo.n_heads, geo.n_kv_heads, geo.head_dim,
                                   name="head_region"), "head_region", want)
                if not torch.equal(got, want):
                    i, j = first_index(got != want)
                    fail(f"head_region({kind!r}, shape={shape}, heads={list(heads)}, n_heads={geo.n_heads}, "
                         f"n_kv_heads={geo.n_kv_heads}, head_dim={geo.head_dim}): entry ({i}, {j}) expected "
                         f"{bool(want[i, j])}, got {bool(got[i, j])}.{_region_mistake(kind, got, geo, heads)}")
                n += 1
    passed(f"head_region matches the library on {n} cases (q, k, v, o and MLP linears; MHA and GQA)")


def _random_matrices(seed: int, shape: tuple[int, int], sparsity: float):
    g = torch.Generator().manual_seed(seed)
    S, U = torch.rand(shape, generator=g), torch.rand(shape, generator=g)
    P = (U * 0.7 + torch.rand(shape, generator=g) * 0.3).argsort(1).argsort(1) < int(shape[1] * sparsity)
    region = torch.zeros(shape, dtype=torch.bool)
    region[: shape[0] // 2] = True
    return P, S, U, region


def _restore_mistake(got, want, P, S, U, region, p, q, p_max) -> str:
    extra, missing = got & ~want, want & ~got
    TS, TUp, TUmax = top_fraction(S, q), top_fraction(U, p), top_fraction(U, p_max)
    if extra.any():
        i, j = first_index(extra)
        at = f"entry ({i}, {j}) is in your R but should not be:"
        if not P[i, j]:
            return (f"{at} that weight was never pruned (it is not in P). You kept the weights that were never pruned "
                    "in R; restoring means giving pruned weights back: intersect with P.")
        if not region[i, j]:
            return f"{at} it lies outside the head region. Intersect with the region."
        if TUp[i, j]:
            return (f"{at} it is in T(U, p), the most utility-important weights. The band is T(U, p_max) \\ T(U, p): "
                    "remove T(U, p).")
        if not TUmax[i, j]:
            return f"{at} it is not in T(U, p_max): the band starts at T(U, p_max)."
        if not TS[i, j]:
            return f"{at} it is not in T(S, q), the top q of the safety scores S (did you rank U, or take the smallest?)."
        return at
    i, j = first_index(missing)
    return (f"entry ({i}, {j}) is in P ∩ T(S, q) ∩ (T(U, p_max) \\ T(U, p)) ∩ region but not in your R. "
            "Check which fraction goes with which score: q with S, p and p_max with U.")


def check_set_operation(your_fn: Callable, toy: Sequence[dict] = ()) -> None:
    """``your_fn(P, S, U, region, p, q, p_max) -> R`` (bool [out, in], the hsr restored set) against the
    library's ``restore_set``, on random matrices and the toy's (dicts with P, S, U, region, p, q, p_max)."""
    cases = [dict(zip(("P", "S", "U", "region"), _random_matrices(0, (8, 12), 0.5)), p=0.5, q=0.5, p_max=0.7,
                  what="random 8×12 matrices (p 0.5, q 0.5, p_max 0.7)"),
             dict(zip(("P", "S", "U", "region"), _random_matrices(1, (10, 10), 0.8)), p=0.2, q=0.3, p_max=0.5,
                  what="random 10×10 matrices (p 0.2, q 0.3, p_max 0.5)"),
             dict(zip(("P", "S", "U", "region"), _random_matrices(2, (6, 16), 0.6)), p=0.3, q=0.6, p_max=0.9,
                  what="random 6×16 matrices (p 0.3, q 0.6, p_max 0.9)")]
    cases += [{**c, "what": c.get("what", "the toy's matrices")} for c in toy]
    for c in cases:
        want = restore_set(c["P"], c["S"], c["U"], c["region"], "hsr", c["p"], c["q"], c["p_max"])
        got = as_mask(call(your_fn, c["P"].clone(), c["S"].clone(), c["U"].clone(), c["region"].clone(), c["p"], c["q"],
                           c["p_max"], name="restore_set"), "restore_set", want)
        if not torch.equal(got, want):
            fail(f"restore_set on {c['what']}: {int(got.sum())} entries restored, expected {int(want.sum())}; "
                 + _restore_mistake(got, want, c["P"], c["S"], c["U"], c["region"], c["p"], c["q"], c["p_max"]))
    passed(f"restore_set matches the library on {len(cases)} cases")


def toy_matrices(run, name: str) -> dict:
    """The inputs of the set operation for the toy's linear ``name`` in ``run``: P (the pruned model's
    mask), S, U (safety and utility Wanda scores), the region of the layer's selected heads, p, q, p_max."""
    from .. import steps
    from ..realign import module_kind
    from .toy import geometry

    R = run.params.realign
    layer = int(name.split(".")[1])
    P = steps.prune.run(run, progress=False).mask([name])[name]
    sc = steps.scores.run(run, progress=False)
    S, U = sc.load("safety", keys=[name])[name].float(), sc.load("utility", keys=[name])[name].float()
    heads = [h for (l, h) in steps.ships.run(run, progress=False).top(R.top_h) if l == layer]
    region = head_region(module_kind(name), tuple(S.shape), geometry(run), heads, "paper")
    return dict(P=P, S=S, U=U, region=region, p=R.p, q=R.q, p_max=R.p_max, heads=heads,
                what=f"the toy's {name} (heads {heads})")
