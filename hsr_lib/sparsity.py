"""Sparsity patterns (docs/method.md): 'unstructured', or 'N:M' (N of every M consecutive inputs of a
row zeroed). The one place a pattern and a sparsity are parsed and checked."""

from __future__ import annotations

import re

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


def check_divisible(pattern: str, in_features: int) -> tuple[int, int] | None:
    """The parsed pattern, after checking that ``in_features`` splits into blocks of M."""
    nm = parse_pattern(pattern)
    if nm is not None and in_features % nm[1]:
        raise ValueError(f"pattern {pattern!r} needs in_features ({in_features}) divisible by {nm[1]}")
    return nm


def pattern_label(pattern: str) -> str:
    """The pattern as a folder-name part: 'unstructured' or '2of4' for '2:4'."""
    nm = parse_pattern(pattern)
    return "unstructured" if nm is None else f"{nm[0]}of{nm[1]}"
