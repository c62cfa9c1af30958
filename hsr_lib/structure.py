"""The sparsity structure a realigned model keeps (docs/using-the-model.md): sparsity per module
type, and, after N:M pruning, how many M-blocks restoring filled above the pattern.

N:M pruning zeroes N of every M consecutive inputs of a row, which sparse tensor cores speed up.
Realignment puts dense values back into some of those blocks, so a block may then hold fewer
than N zeros: the model is no longer N:M there and loses that speedup. Pure functions of masks
(True = pruned, as in :mod:`hsr_lib.masks`).
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping

import torch

from .sparsity import parse_pattern


def module_type(name: str) -> str:
    """'layers.3.self_attn.q_proj' → 'q_proj'."""
    return name.rsplit(".", 1)[-1]


def blocks_below_n(mask: torch.Tensor, n: int, m: int) -> tuple[int, int]:
    """``(blocks, blocks with fewer than n pruned entries)`` of an ``[out, in]`` mask cut into blocks
    of ``m`` consecutive inputs per row; ValueError when ``in`` does not split into blocks of m."""
    if mask.dim() != 2 or mask.shape[1] % m:
        raise ValueError(f"a mask of shape {tuple(mask.shape)} does not split into blocks of {m} inputs per row")
    per_block = mask.reshape(mask.shape[0], mask.shape[1] // m, m).sum(-1)
    return per_block.numel(), int((per_block < n).sum())


def structure_report(masks: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], pattern: str):
    """One row per module type: modules, parameters, pruned, sparsity (fraction) and, for an N:M
    ``pattern``, ``blocks``, ``blocks_below_n`` and ``share_below_n`` (fraction of blocks that now
    hold fewer than N zeros). ``masks``: a mapping or ``(name, mask)`` pairs (one at a time is enough)."""
    import pandas as pd

    nm = parse_pattern(pattern)
    rows: dict[str, dict] = {}
    for name, mask in (masks.items() if isinstance(masks, Mapping) else masks):
        r = rows.setdefault(module_type(name), {"module_type": module_type(name), "modules": 0, "params": 0,
                                                 "pruned": 0, "blocks": 0, "blocks_below_n": 0})
        r["modules"] += 1
        r["params"] += mask.numel()
        r["pruned"] += int(mask.sum())
        if nm is not None:
            blocks, below = blocks_below_n(mask, *nm)
            r["blocks"] += blocks
            r["blocks_below_n"] += below
    cols = ["module_type", "modules", "params", "pruned", "sparsity"]
    if nm is not None:
        cols += ["blocks", "blocks_below_n", "share_below_n"]
    if not rows:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame(rows.values())
    df["sparsity"] = df.pruned / df.params
    if nm is not None:
        df["share_below_n"] = df.blocks_below_n / df.blocks
    return df[cols].reset_index(drop=True)


def mask_file_report(path: str | os.PathLike, pattern: str):
    """:func:`structure_report` of a mask file, unpacking one module at a time (a 7B model's masks
    are never held unpacked all at once)."""
    from .masks import load_masks, mask_shapes

    return structure_report(((k, load_masks(path, [k])[k]) for k in mask_shapes(path)), pattern)
