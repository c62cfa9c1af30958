"""Sparsity patterns and the mask rule of pruning (docs/method.md): 'unstructured' (per output row
the ``int(in·s)`` lowest scores), or 'N:M' (the N lowest of every M consecutive inputs of a row).
The one place a pattern and a sparsity are parsed and checked: :func:`rule` checks them once and
gives a :class:`Rule` that masks any number of matrices without checking again.

Tensor-level only: torch is imported when a mask is made, so parsing params stays light."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_NM = re.compile(r"(\d+):(\d+)")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """None for 'unstructured', ``(N, M)`` for 'N:M' with integers 0 < N < M; ValueError otherwise."""
    if pattern == "unstructured":
        return None
    m = _NM.fullmatch(str(pattern))
    if not m or not 0 < int(m[1]) < int(m[2]):
        raise ValueError(f"pruning pattern {pattern!r}: use 'unstructured' or 'N:M' with integers 0 < N < M")
    return int(m[1]), int(m[2])


def check_sparsity(sparsity: float, pattern: str = "unstructured") -> tuple[int, int] | None:
    """Refuse a sparsity outside [0, 1) or one an N:M pattern does not give; the parsed pattern."""
    nm = parse_pattern(pattern)
    if not 0 <= sparsity < 1:
        raise ValueError(f"pruning sparsity must be in [0, 1) (got {sparsity})")
    if nm is not None and abs(sparsity - nm[0] / nm[1]) > 1e-9:
        raise ValueError(f"pruning pattern {pattern!r} needs sparsity {nm[0] / nm[1]} (got {sparsity})")
    return nm


def pattern_label(pattern: str) -> str:
    """The pattern as a folder-name part: 'unstructured' or '2of4' for '2:4'."""
    nm = parse_pattern(pattern)
    return "unstructured" if nm is None else f"{nm[0]}of{nm[1]}"


@dataclass(frozen=True)
class Rule:
    """A checked sparsity and pattern (make one with :func:`rule`): the mask rule of pruning."""

    sparsity: float
    pattern: str = "unstructured"
    nm: tuple[int, int] | None = None

    def check_divisible(self, in_features: int, name: str = "") -> None:
        """Under N:M, ``in_features`` must split into blocks of M (a property of the matrix, not of the rule)."""
        if self.nm is not None and in_features % self.nm[1]:
            raise ValueError(f"{name + ': ' if name else ''}pattern {self.pattern!r} needs in_features "
                             f"({in_features}) divisible by {self.nm[1]}")

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """True where a weight is pruned: per row the ``int(in·s)`` lowest scores (stable ascending
        sort), or under N:M the N lowest of every block of M consecutive inputs of a row."""
        import torch

        rows, cols = scores.shape
        mask = torch.zeros(rows, cols, dtype=torch.bool, device=scores.device)
        if self.nm is None:
            k = int(cols * self.sparsity)
            if k:  # = the first k of a stable ascending sort, in linear time: below the k-th value, then ties by column
                kth = scores.kthvalue(k, dim=1, keepdim=True).values
                below, tie = scores < kth, scores == kth
                mask = below | (tie & (tie.cumsum(1) <= k - below.sum(1, keepdim=True)))
            return mask
        self.check_divisible(cols)
        n, m = self.nm
        order = torch.argsort(scores.reshape(rows, cols // m, m), dim=2, stable=True)[..., :n]
        return mask.view(rows, cols // m, m).scatter_(2, order, True).view(rows, cols)


def rule(sparsity: float | Rule, pattern: str = "unstructured") -> Rule:
    """``sparsity`` and ``pattern`` checked once (:func:`check_sparsity`); a :class:`Rule` passes
    through unchanged (it was checked when it was made), so an entry point checks its values once
    and hands the rule to everything below it."""
    if isinstance(sparsity, Rule):
        return sparsity
    return Rule(sparsity, pattern, check_sparsity(sparsity, pattern))


def prune_mask(scores: torch.Tensor, sparsity: float | Rule, pattern: str = "unstructured") -> torch.Tensor:
    """True where a weight is pruned under ``rule(sparsity, pattern)`` (see :meth:`Rule.mask`)."""
    return rule(sparsity, pattern).mask(scores)
