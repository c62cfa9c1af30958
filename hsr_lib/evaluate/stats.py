"""Uncertainty of the evaluation's numbers (docs/method.md, "Intervals and paired tests"): the Wilson
interval of a proportion, a seeded paired bootstrap over items (resampled within each benchmark)
for ratios and differences, and McNemar's test of two variants on the same items.

Pure functions on numbers and numpy arrays; rates here are fractions in [0, 1].
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

Z95 = 1.959964  # the standard normal's 97.5% quantile: two-sided 95%
EXACT_BELOW = 25  # McNemar: the exact binomial test below this many discordant pairs, chi-square from it on
B_DEFAULT = 2000
CHUNK = 250  # resamples drawn and evaluated at once (bounds memory on large benchmarks)

Arrays = Mapping[str, Sequence[np.ndarray]]


def wilson(k: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of the proportion ``k / n`` (fractions; ``(nan, nan)`` when ``n`` is 0).

    Centre (k + z²/2) / (n + z²), half-width z·sqrt(k(n−k)/n + z²/4) / (n + z²) (Wilson 1927).
    """
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"wilson: need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return float("nan"), float("nan")
    z2 = z * z
    centre = (k + z2 / 2) / (n + z2)
    half = z * math.sqrt(k * (n - k) / n + z2 / 4) / (n + z2)
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if k == 0 else lo), (1.0 if k == n else hi)  # exact ends where rounding would miss them


def mcnemar(a: Sequence[bool], b: Sequence[bool], exact_below: int = EXACT_BELOW) -> dict:
    """McNemar's test of two paired binary outcomes (the same items under two variants).

    ``n01`` counts items where ``a`` is false and ``b`` true, ``n10`` the reverse. With fewer than
    ``exact_below`` discordant pairs the p-value is the exact two-sided binomial one,
    min(1, 2·P[X ≤ min(n01, n10)]) with X ~ Bin(n01 + n10, ½); otherwise the chi-square statistic
    with continuity correction, (|n01 − n10| − 1)² / (n01 + n10), on one degree of freedom.
    """
    x, y = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"mcnemar: need two 1-D arrays of the same length, got shapes {x.shape} and {y.shape}")
    n01, n10 = int((~x & y).sum()), int((x & ~y).sum())
    d = n01 + n10
    if d < exact_below:
        tail = sum(math.comb(d, i) for i in range(min(n01, n10) + 1)) / 2 ** d if d else 1.0
        return {"n01": n01, "n10": n10, "p": min(1.0, 2 * tail), "method": "exact"}
    stat = (abs(n01 - n10) - 1) ** 2 / d
    return {"n01": n01, "n10": n10, "p": math.erfc(math.sqrt(stat / 2)), "method": "chi2"}


def bootstrap_indices(sizes: Mapping[str, int], B: int = B_DEFAULT, seed: int = 0,
                      chunk: int = CHUNK) -> Iterator[dict[str, np.ndarray]]:
    """The resamples of a stratified bootstrap, ``chunk`` at a time: per group an index array of
    shape (rows, size), drawn with replacement within the group from ``default_rng(seed)``."""
    if B < 1:
        raise ValueError(f"bootstrap: B must be >= 1, got {B}")
    rng = np.random.default_rng(seed)
    for start in range(0, B, chunk):
        rows = min(chunk, B - start)
        yield {g: rng.integers(0, n, size=(rows, n)) for g, n in sizes.items()}


def paired_bootstrap(stat: Callable[[Arrays], float | np.ndarray], arrays_by_group: Arrays, B: int = B_DEFAULT,
                     seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of ``stat`` under a paired bootstrap resampled within each group.

    ``arrays_by_group`` maps a group (a benchmark) to equally long arrays, one per variant and
    aligned by item; every resample draws the same items for all of a group's arrays (paired).
    ``stat`` takes a mapping of the same shape and reduces along the last axis (``mean(axis=-1)``),
    so it is evaluated on a whole chunk of resamples at once. Resamples where ``stat`` is NaN (an
    undefined ratio) are left out; ``(nan, nan)`` when none is defined.
    """
    sizes = {}
    for g, arrays in arrays_by_group.items():
        lengths = {len(a) for a in arrays}
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError(f"paired_bootstrap: group {g!r} needs non-empty arrays of one length, got {sorted(lengths)}")
        sizes[g] = lengths.pop()
    data = {g: [np.asarray(a, dtype=float) for a in arrays] for g, arrays in arrays_by_group.items()}
    values = []
    for idx in bootstrap_indices(sizes, B, seed):
        resampled = {g: [a[idx[g]] for a in arrays] for g, arrays in data.items()}
        values.append(np.broadcast_to(np.asarray(stat(resampled), dtype=float), (len(next(iter(idx.values()))),)))
    v = np.concatenate(values)
    v = v[~np.isnan(v)]
    if not len(v):
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    return float(np.quantile(v, alpha)), float(np.quantile(v, 1 - alpha))


def mean_rate(arrays: Sequence[np.ndarray], weights: str = "pooled") -> np.ndarray:
    """Combined rate over groups' per-item outcomes (last axis): ``pooled`` (every item counts once)
    or ``mean`` (the mean of the groups' rates, as the paper averages SafeBench and Ch3Ef)."""
    if weights == "pooled":
        return sum(a.sum(axis=-1) for a in arrays) / sum(a.shape[-1] for a in arrays)
    if weights == "mean":
        return sum(a.mean(axis=-1) for a in arrays) / len(arrays)
    raise ValueError(f"unknown combination {weights!r}; use 'pooled' or 'mean'")


def restoration_rate(pruned: float | np.ndarray, realigned: float | np.ndarray,
                     dense: float | np.ndarray) -> float | np.ndarray:
    """(pruned − realigned) / (pruned − dense), NaN where pruning did not raise the rate (elementwise)."""
    p, r, d = (np.asarray(x, dtype=float) for x in (pruned, realigned, dense))
    lost = p - d
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(lost > 0, (p - r) / np.where(lost > 0, lost, 1.0), np.nan)
    return out if out.ndim else float(out)
