"""Realignment of one 7B-size layer (q, k, v, o of 4096×4096, 32 heads, ten selected heads) with
random scores: the vectorized code vs two per-entry baselines written here in the structure of a
direct transcription (for each entry of F, find its head and test whether it is pruned): with F
computed vectorized, and with the T-sets as Python sets. All in one process; the masks must be
identical.

    .venv/bin/python benchmarks/realign_cpu.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from hsr_lib.adapters import Geometry
from hsr_lib.realign import head_region, hsr_candidates, rederived_mask, restore_set

GEO = Geometry(n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128, hidden_size=4096)
P_, Q_, PMAX = 0.5, 0.5, 0.7
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj")


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    heads = sorted(torch.randperm(GEO.n_heads, generator=g)[:10].tolist())
    mats = {}
    for kind in KINDS:
        S = torch.rand(4096, 4096, generator=g)
        U = torch.rand(4096, 4096, generator=g)
        mats[kind] = (S, U, rederived_mask(U, 0.5))
    return heads, mats


def vectorized(heads, mats):
    return {kind: restore_set(P, S, U, head_region(kind, tuple(S.shape), GEO, heads), "hsr", P_, Q_, PMAX)
            for kind, (S, U, P) in mats.items()}


def python_sets(heads, mats):
    """The per-entry style: T-sets as Python sets of flat indices (a stable descending sort, ties
    to the lower index as docs/method.md fixes), F by set algebra, then one Python iteration per
    candidate entry of F."""
    d = GEO.head_dim
    chosen = set(heads)
    out = {}
    for kind, (S, U, P) in mats.items():
        n = S.numel()

        def T(X, f):
            k = int(f * n)
            return set(torch.sort(X.reshape(-1), descending=True, stable=True).indices[:k].tolist())

        F = (T(S, Q_) & T(U, PMAX)) - T(U, P_)
        cols = S.shape[1]
        pruned = P.reshape(-1)
        R = torch.zeros(n, dtype=torch.bool)
        for idx in F:
            row, col = divmod(idx, cols)
            head = (col if kind == "o_proj" else row) // d
            if head in chosen and pruned[idx]:
                R[idx] = True
        out[kind] = R.view(S.shape)
    return out


def loop(heads, mats):
    """F vectorized, then one Python iteration per candidate entry of F."""
    d = GEO.head_dim
    chosen = set(heads)
    out = {}
    for kind, (S, U, P) in mats.items():
        F = hsr_candidates(S, U, P_, Q_, PMAX)
        cols = S.shape[1]
        pruned = P.reshape(-1).tolist()
        R = torch.zeros(S.numel(), dtype=torch.bool)
        for idx in torch.nonzero(F.reshape(-1)).squeeze(1).tolist():
            row, col = divmod(idx, cols)
            head = (col if kind == "o_proj" else row) // d  # MHA: KV head = query head
            if head in chosen and pruned[idx]:
                R[idx] = True
        out[kind] = R.view(S.shape)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    heads, mats = inputs()
    t0 = time.perf_counter()
    fast = vectorized(heads, mats)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow = loop(heads, mats)
    t_slow = time.perf_counter() - t0
    t0 = time.perf_counter()
    sets = python_sets(heads, mats)
    t_sets = time.perf_counter() - t0
    same = all(torch.equal(fast[k], slow[k]) for k in KINDS)
    same_sets = all(torch.equal(fast[k], sets[k]) for k in KINDS)
    out = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
           "layer": "q, k, v, o of 4096×4096, 32 heads, 10 selected", "restored": {k: int(v.sum()) for k, v in fast.items()},
           "vectorized_s": round(t_fast, 3),
           "loop_over_F_s": round(t_slow, 2), "speedup_vs_loop_over_F": round(t_slow / t_fast, 1),
           "python_sets_s": round(t_sets, 2), "speedup_vs_python_sets": round(t_sets / t_fast, 1),
           "identical_masks": same and same_sets}
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    if not (same and same_sets):
        raise SystemExit("masks differ")


if __name__ == "__main__":
    main()
