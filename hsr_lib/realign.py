"""The HSR set operation and head regions (docs/method.md), on tensors, vectorized.

For a prunable linear W ∈ R^{out×in} with n = out·in, T(X, f) is the set of the int(f·n) largest
entries of X (flattened; ties go to the lower flat index):

    F = T(S, q) ∩ T(U, p_max) \\ T(U, p)         (safety-critical, moderately utility-relevant)
    R = P ∩ F ∩ region(selected heads of the layer)

P is the base mask (True = pruned). Restored weights take their dense values; MLP linears are
never restored. ``hsr_a`` restores all of P ∩ region (no F).

One matrix: :func:`restore_set` (and its parts); a whole model: :func:`realign_model` (masks and
scores in, the realigned masks and per-module counts out), or :func:`realign_modules`, the same one
module at a time. Tensor-level only: nothing here loads a model or reads a file; the step that
stores a run's realignment is :mod:`hsr_lib.steps.realign`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch

from .adapters import ATTN_PARTS, Geometry
from .ships import Head, head_key
from .sparsity import Rule, prune_mask, rule

VARIANTS = ("hsr", "hsr_a", "random_heads")
REGION_MODES = ("paper", "reference")
BASE_MASKS = ("actual", "rederived")


SAMPLE = 1 << 16  # entries sampled to bracket the threshold of a large matrix


def top_fraction(X: torch.Tensor, f: float) -> torch.Tensor:
    """Boolean mask of T(X, f): the int(f·n) largest entries of X, ties to the lower flat index."""
    if not 0.0 <= f <= 1.0:
        raise ValueError(f"fraction {f}: must be in [0, 1]")
    return _top(X, f)


def _top(X: torch.Tensor, f: float) -> torch.Tensor:
    """:func:`top_fraction` without the check of ``f``."""
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
    check_fractions(p, q, p_max)
    return _candidate_sets(S, U, p, q, p_max)


def check_fractions(p: float, q: float, p_max: float) -> None:
    """Refuse fractions outside 0 ≤ p ≤ p_max ≤ 1 and 0 ≤ q ≤ 1."""
    if not 0.0 <= p <= p_max <= 1.0:
        raise ValueError(f"need 0 ≤ p ≤ p_max ≤ 1, got p={p}, p_max={p_max}")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"fraction q={q}: must be in [0, 1]")


def _candidate_sets(S: torch.Tensor, U: torch.Tensor, p: float, q: float, p_max: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    return _top(S, q), _top(U, p_max) & ~_top(U, p)


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
    if mode not in REGION_MODES:
        raise ValueError(f"region mode {mode!r}: use 'paper' or 'reference'")
    return _region(kind, shape, geo, heads, mode, device)


def _region(kind: str, shape: tuple[int, int], geo: Geometry, heads: Iterable[int], mode: str,
            device=None) -> torch.Tensor:
    """:func:`head_region` without the check of ``mode``."""
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


def rederived_mask(U: torch.Tensor, sparsity: float | Rule, pattern: str = "unstructured") -> torch.Tensor:
    """The released code's base mask: the pruning rule re-applied to the dense utility scores with
    the run's pattern (per output row the int(in·s) lowest, stable ascending sort; or under N:M
    the N lowest of every M consecutive inputs)."""
    return prune_mask(U, sparsity, pattern)


def restore_set(P: torch.Tensor, S: torch.Tensor, U: torch.Tensor, region: torch.Tensor, variant: str,
                p: float, q: float, p_max: float, F: torch.Tensor | None = None) -> torch.Tensor:
    """R for one matrix: ``P ∩ F ∩ region`` (hsr, random_heads) or ``P ∩ region`` (hsr_a);
    pass ``F`` when it is already computed."""
    check_variant(variant)
    if variant == "hsr_a":
        return P & region
    if not region.any():
        return region.clone()
    return P & region & (F if F is not None else hsr_candidates(S, U, p, q, p_max))


def check_variant(variant: str) -> None:
    """Refuse a realignment variant other than hsr, hsr_a and random_heads."""
    if variant not in VARIANTS:
        raise ValueError(f"realign variant {variant!r}: use hsr, hsr_a or random_heads")


def random_heads(geo: Geometry, top_h: int, seed: int) -> list[tuple[int, int]]:
    """``top_h`` heads drawn uniformly without replacement (seeded), layer-major sorted."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(geo.n_layers * geo.n_heads, generator=g)[:top_h].tolist()
    return sorted((i // geo.n_heads, i % geo.n_heads) for i in flat)


def attribution(kind: str, geo: Geometry, heads: Sequence[int], mode: str) -> list[tuple[str, int, list[int]]]:
    """The disjoint units a module's restored weights are counted in, ``(unit, index, heads)``:
    a query head's own slice (``head``); k/v rows or bands shared by a KV group under GQA
    (``kv_group``, once per weight, not once per head of the group); and, in ``reference`` mode,
    o_proj, whose region is the whole matrix (``layer``)."""
    heads = sorted(set(heads))
    if kind == "o_proj" and mode == "reference":
        return [("layer", -1, heads)]
    if kind in ("k_proj", "v_proj") and geo.group_size > 1:
        groups: dict[int, list[int]] = defaultdict(list)
        for h in heads:
            groups[geo.kv_head(h)].append(h)
        return [("kv_group", g, hs) for g, hs in sorted(groups.items())]
    return [("head", h, [h]) for h in heads]


@dataclass
class ModuleRealignment:
    """One prunable linear after realignment: its base mask P (True = pruned), the restored set R
    (None where no selected head's region reaches the module, i.e. R = ∅), the counts of its sets
    (``counts``: one ``modules.csv`` row; None when R = ∅ by construction) and the restored entries
    per attribution unit (``units``)."""

    name: str
    base: torch.Tensor
    restored: torch.Tensor | None = None
    counts: dict[str, Any] | None = None
    units: list[dict[str, Any]] = field(default_factory=list)

    @property
    def mask(self) -> torch.Tensor:
        """The realigned mask ``P \\ R`` (True = still pruned)."""
        return self.base if self.restored is None else self.base & ~self.restored


@dataclass
class Realignment:
    """What :func:`realign_model` returns: per module the realigned mask ``P \\ R``, R and P (only
    the modules realignment touched: the attention linears of the selected heads' layers, and
    every module when P is re-derived), the per-module counts and the per-unit counts."""

    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    restored: dict[str, torch.Tensor] = field(default_factory=dict)
    base: dict[str, torch.Tensor] = field(default_factory=dict)
    modules: list[dict[str, Any]] = field(default_factory=list)
    units: list[dict[str, Any]] = field(default_factory=list)

    def totals(self, n_params: int) -> dict[str, Any]:
        """|R|, |R ∩ actual| and |R \\ actual| over the model, and |R| and |R ∩ actual| in ‱ of ``n_params``."""
        return totals(self.modules, n_params)


def totals(modules: Sequence[Mapping[str, Any]], n_params: int) -> dict[str, Any]:
    """Sum the per-module counts: restored |R|, newly non-zero |R ∩ actual|, survivors overwritten
    |R \\ actual|, and the first two in ‱ of ``n_params`` (the decoder linears' parameters)."""
    restored = sum(int(r["restored"]) for r in modules)
    newly = sum(int(r["newly_nonzero"]) for r in modules)
    return {"restored": restored, "newly_nonzero": newly,
            "survivors_overwritten": sum(int(r["survivors_overwritten"]) for r in modules),
            "restored_ratio_permyriad": restored / n_params * 1e4 if n_params else math.nan,
            "newly_nonzero_ratio_permyriad": newly / n_params * 1e4 if n_params else math.nan}


def realign_modules(pruned: Mapping[str, torch.Tensor], safety: Mapping[str, torch.Tensor],
                    utility: Mapping[str, torch.Tensor], heads: Sequence[Head], geo: Geometry, *,
                    variant: str = "hsr", p: float = 0.5, q: float = 0.5, p_max: float = 0.7,
                    region: str = "paper", base_mask: str = "actual", sparsity: float | Rule | None = None,
                    pattern: str = "unstructured") -> Iterator[ModuleRealignment]:
    """:func:`realign_model` one module at a time (a model's masks need not all be in memory):
    yields a :class:`ModuleRealignment` for every module realignment touches, in the order of
    ``pruned``'s keys. The mappings are read only for those modules (they may load lazily)."""
    check_variant(variant)
    check_fractions(p, q, p_max)
    if region not in REGION_MODES:
        raise ValueError(f"region mode {region!r}: use 'paper' or 'reference'")
    if base_mask not in BASE_MASKS:
        raise ValueError(f"base_mask {base_mask!r}: use 'actual' or 'rederived'")
    rederive = base_mask == "rederived"
    if rederive and sparsity is None:
        raise ValueError("base_mask 'rederived' re-applies the pruning rule: give its sparsity (and pattern)")
    mask_rule = rule(sparsity, pattern) if rederive else None
    by_layer: dict[int, list[int]] = defaultdict(list)
    for layer, h in heads:
        if not (0 <= layer < geo.n_layers and 0 <= h < geo.n_heads):
            raise ValueError(f"head {head_key(layer, h)}: the model has {geo.n_layers} layers of {geo.n_heads} heads")
        by_layer[layer].append(h)
    for name in pruned:
        layer, kind = int(name.split(".")[1]), module_kind(name)
        restoring = layer in by_layer and kind in ATTN_PARTS
        if not (restoring or rederive):
            continue
        U = utility[name].float()
        base = mask_rule.mask(U) if mask_rule is not None else None
        if not restoring:
            yield ModuleRealignment(name, base)  # nothing restored here: P \ R = P
            continue
        actual = pruned[name]
        base = actual if base is None else base
        S = safety[name].float()
        reg = _region(kind, tuple(S.shape), geo, by_layer[layer], region)
        safe, band = _candidate_sets(S, U, p, q, p_max)  # the three selections, once
        F = safe & band
        R = base & reg if variant == "hsr_a" else base & reg & F
        counts = {"module": name, "layer": layer, "kind": kind, "params": S.numel(),
                  "pruned": int(base.sum()), "top_q_safety": int(safe.sum()), "utility_band": int(band.sum()),
                  "F": int(F.sum()), "pruned_in_region": int((base & reg).sum()), "restored": int(R.sum()),
                  "newly_nonzero": int((R & actual).sum()), "survivors_overwritten": int((R & ~actual).sum())}
        units = [{"layer": layer, "unit": unit, "index": index, "heads": " ".join(head_key(layer, h) for h in hs),
                  "kind": kind, "restored": int((R & _region(kind, tuple(R.shape), geo, hs, region)).sum())}
                 for unit, index, hs in attribution(kind, geo, by_layer[layer], region)]
        yield ModuleRealignment(name, base, R, counts, units)


def realign_model(pruned: Mapping[str, torch.Tensor], safety: Mapping[str, torch.Tensor],
                  utility: Mapping[str, torch.Tensor], heads: Sequence[Head], geo: Geometry, *,
                  variant: str = "hsr", p: float = 0.5, q: float = 0.5, p_max: float = 0.7, region: str = "paper",
                  base_mask: str = "actual", sparsity: float | Rule | None = None,
                  pattern: str = "unstructured") -> Realignment:
    """HSR over a whole model: ``pruned`` (the pruning mask per module ``layers.{i}.{module}``, True =
    pruned), the safety and utility scores S and U per module, and the selected ``heads`` in; the
    realigned masks ``P \\ R`` and per-module counts out. P is ``pruned`` (``base_mask='actual'``) or,
    as the released code does, the pruning rule (``sparsity``, ``pattern``) re-applied to U in every
    module (``'rederived'``). Every setting is checked once, here."""
    out = Realignment()
    for m in realign_modules(pruned, safety, utility, heads, geo, variant=variant, p=p, q=q, p_max=p_max,
                             region=region, base_mask=base_mask, sparsity=sparsity, pattern=pattern):
        out.masks[m.name], out.base[m.name] = m.mask, m.base
        if m.restored is not None:
            out.restored[m.name] = m.restored
            out.modules.append(m.counts)
            out.units += m.units
    return out


@torch.no_grad()
def survivors_changed(dense: Mapping[str, torch.Tensor], updated: Mapping[str, torch.Tensor],
                      overwritten: Mapping[str, torch.Tensor]) -> int:
    """How many survivors in R \\ actual (flat indices per module, ``overwritten``) hold a value in the
    pruned model (``updated``: SparseGPT's weights) other than the dense one."""
    n = 0
    for name, idx in overwritten.items():
        n += int((updated[name].reshape(-1)[idx].float() != dense[name].reshape(-1)[idx].float()).sum())
    return n
