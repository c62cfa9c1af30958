"""The HSR set operation and head regions (docs/method.md), on tensors, vectorized.

For a prunable linear W ∈ R^{out×in} with n = out·in, T(X, f) is the set of the int(f·n) largest
entries of X (flattened; ties go to the lower flat index):

    F = T(S, q) ∩ T(U, p_max) \\ T(U, p)         (safety-critical, moderately utility-relevant)
    R = P ∩ F ∩ region(selected heads of the layer)

P is the base mask (True = pruned). Restored weights take their dense values; MLP linears are
never restored. ``hsr_a`` restores all of P ∩ region (no F).
"""

from __future__ import annotations

from typing import Iterable

import torch

from .adapters import ATTN_PARTS, Geometry
from .prune import prune_mask


SAMPLE = 1 << 16  # entries sampled to bracket the threshold of a large matrix


def top_fraction(X: torch.Tensor, f: float) -> torch.Tensor:
    """Boolean mask of T(X, f): the int(f·n) largest entries of X, ties to the lower flat index."""
    if not 0.0 <= f <= 1.0:
        raise ValueError(f"fraction {f}: must be in [0, 1]")
    n = X.numel()
    k = int(f * n)
    if k == 0:
        return torch.zeros(X.shape, dtype=torch.bool, device=X.device)
    if k == n:
        return torch.ones(X.shape, dtype=torch.bool, device=X.device)
    flat = X.reshape(-1).float()
    mask = _top_k_bracketed(flat, k) if n > 4 * SAMPLE else None
    return (mask if mask is not None else _top_k_exact(flat, k)).view(X.shape)


def _top_k_exact(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest entries with one O(n) selection over all of them: everything above the k-th
    largest value is in, and the first entries equal to it (in flat order) fill up to k."""
    thresh = torch.kthvalue(flat, flat.numel() - k + 1).values
    mask = flat > thresh
    need = k - int(mask.sum())
    mask[torch.nonzero(flat == thresh).squeeze(1)[:need]] = True
    return mask


def _top_k_bracketed(flat: torch.Tensor, k: int) -> torch.Tensor | None:
    """The same set in about two passes: a seeded sample brackets the k-th largest value
    (``lo ≤ v ≤ hi``); one pass marks the entries above ``hi``, another gathers the few in
    ``[lo, hi]``, and the exact selection runs among those. None when the sample was unlucky and
    the bracket missed the value (the caller then selects over every entry)."""
    n = flat.numel()
    rank = n - k + 1  # 1-based rank of the threshold from the bottom
    g = torch.Generator(device="cpu").manual_seed(0)
    s = flat[torch.randint(n, (SAMPLE,), generator=g).to(flat.device)].sort().values
    u = (rank - 0.5) / n
    j = int(u * SAMPLE)
    margin = int(6 * (SAMPLE * u * (1 - u)) ** 0.5) + 32
    lo = s[j - margin] if j - margin >= 0 else None
    hi = s[j + margin] if j + margin < SAMPLE else None
    mask = flat > hi if hi is not None else torch.zeros(n, dtype=torch.bool, device=flat.device)
    n_above = int(mask.sum())
    inside = ~mask if lo is None else (flat >= lo) & ~mask
    idx = torch.nonzero(inside).squeeze(1)  # ascending flat order
    below = n - n_above - idx.numel()
    if not below < rank <= below + idx.numel():
        return None
    cand = flat[idx]
    thresh = torch.kthvalue(cand, rank - below).values
    gt = cand > thresh
    mask[idx[gt]] = True
    need = k - n_above - int(gt.sum())
    mask[idx[cand == thresh][:need]] = True
    return mask


def candidate_sets(S: torch.Tensor, U: torch.Tensor, p: float, q: float, p_max: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T(S, q), T(U, p_max) \\ T(U, p))`` for one matrix: the safety set and the utility band."""
    if not 0.0 <= p <= p_max <= 1.0:
        raise ValueError(f"need 0 ≤ p ≤ p_max ≤ 1, got p={p}, p_max={p_max}")
    return top_fraction(S, q), top_fraction(U, p_max) & ~top_fraction(U, p)


def hsr_candidates(S: torch.Tensor, U: torch.Tensor, p: float, q: float, p_max: float) -> torch.Tensor:
    """F = T(S, q) ∩ T(U, p_max) \\ T(U, p) for one matrix."""
    safety, band = candidate_sets(S, U, p, q, p_max)
    return safety & band


def module_kind(name: str) -> str:
    """'layers.3.self_attn.q_proj' → 'q_proj'."""
    return name.rsplit(".", 1)[-1]


def head_region(kind: str, shape: tuple[int, int], geo: Geometry, heads: Iterable[int], mode: str = "paper",
                device=None) -> torch.Tensor:
    """Boolean [out, in] mask of the weights of ``heads`` (query heads of one layer) in a q/k/v/o
    linear. ``paper``: q rows of each head, k/v rows of its KV head, o columns of each head.
    ``reference`` (the released code): q input-column bands of width in/H, k/v input-column bands
    of width in/H_kv for the head's KV group, o_proj everywhere."""
    out_f, in_f = shape
    heads = sorted(set(heads))
    region = torch.zeros(shape, dtype=torch.bool, device=device)
    if kind not in ATTN_PARTS:
        return region  # MLP linears are never restored
    if mode == "paper":
        for h in heads:
            if kind == "q_proj":
                region[geo.q_rows(h), :] = True
            elif kind in ("k_proj", "v_proj"):
                region[geo.kv_rows(geo.kv_head(h)), :] = True
            else:
                region[:, geo.q_rows(h)] = True
        return region
    if mode != "reference":
        raise ValueError(f"region mode {mode!r}: use 'paper' or 'reference'")
    if kind == "o_proj":
        return region.fill_(bool(heads))
    for h in heads:
        if kind == "q_proj":
            w = in_f // geo.n_heads
            region[:, h * w:(h + 1) * w] = True
        else:
            w = in_f // geo.n_kv_heads
            g = geo.kv_head(h)
            region[:, g * w:(g + 1) * w] = True
    return region


def rederived_mask(U: torch.Tensor, sparsity: float, pattern: str = "unstructured") -> torch.Tensor:
    """The released code's base mask: the pruning rule re-applied to the dense utility scores with
    the run's pattern (per output row the int(in·s) lowest, stable ascending sort; or under N:M
    the N lowest of every M consecutive inputs)."""
    return prune_mask(U, sparsity, pattern)


def restore_set(P: torch.Tensor, S: torch.Tensor, U: torch.Tensor, region: torch.Tensor, variant: str,
                p: float, q: float, p_max: float, F: torch.Tensor | None = None) -> torch.Tensor:
    """R for one matrix: ``P ∩ F ∩ region`` (hsr, random_heads) or ``P ∩ region`` (hsr_a);
    pass ``F`` when it is already computed."""
    if variant == "hsr_a":
        return P & region
    if variant not in ("hsr", "random_heads"):
        raise ValueError(f"realign variant {variant!r}: use hsr, hsr_a or random_heads")
    if not region.any():
        return region.clone()
    return P & region & (F if F is not None else hsr_candidates(S, U, p, q, p_max))


def random_heads(geo: Geometry, top_h: int, seed: int) -> list[tuple[int, int]]:
    """``top_h`` heads drawn uniformly without replacement (seeded), layer-major sorted."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(geo.n_layers * geo.n_heads, generator=g)[:top_h].tolist()
    return sorted((i // geo.n_heads, i % geo.n_heads) for i in flat)
