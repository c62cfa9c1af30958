"""Ships head scores (docs/method.md): the three score variants, global top-h head selection, and
the authors' one-line JSON format.

Every score compares the unablated model with the model ablated at head (l, h), on N harmful
prompts, at the last position:

* ``kl``: mean over prompts of KL(p ‖ p̃) of the next-token distributions, both + 1e-12;
* ``subspace`` (the paper's dataset-level Ships): Σ_{r ≤ r_max} of the principal angles, in
  degrees, between the top-r_max left singular subspaces of X and X̃ (N × D final-norm states);
* ``hidden0_angle`` (the released code): the angle between column 0 of X and of X̃ (hidden unit 0
  across the prompts), degrees(arccos(clamp(|cos|, −1, 1))).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping

import torch

SCORES = ("kl", "subspace", "hidden0_angle")
Head = tuple[int, int]


def kl_per_prompt(ref_logits: torch.Tensor, abl_logits: torch.Tensor, smooth: float = 1e-12) -> torch.Tensor:
    """KL(p ‖ p̃) per row of [N, V] logits (fp64), both distributions smoothed by ``smooth``."""
    p = torch.softmax(ref_logits.double(), -1) + smooth
    q = torch.softmax(abl_logits.double(), -1) + smooth
    return (p * (p.log() - q.log())).sum(-1)


def subspace_angle(X: torch.Tensor, Xt: torch.Tensor, r_max: int = 1) -> float:
    """Σ_{r ≤ r_max} arccos(σ_r(UᵀŨ)) in degrees, U and Ũ the top-r_max left singular vectors.

    Computed as atan2(sin, cos) with the sines from (I − UUᵀ)Ũ (Björck & Golub): the same angles,
    without arccos's loss of precision for nearly equal subspaces."""
    X, Xt = X.double(), Xt.double()
    r = min(r_max, *X.shape)
    U = torch.linalg.svd(X, full_matrices=False)[0][:, :r]
    Ut = torch.linalg.svd(Xt, full_matrices=False)[0][:, :r]
    cos = torch.linalg.svdvals(U.T @ Ut).clamp(0, 1)  # descending
    sin = torch.linalg.svdvals(Ut - U @ (U.T @ Ut)).clamp(0, 1).flip(0)  # ascending: pairs with cos
    return math.degrees(torch.atan2(sin, cos).sum().item())


def subspace_angle_arccos(X: torch.Tensor, Xt: torch.Tensor, r_max: int = 1) -> float:
    """The textbook form Σ arccos(σ_r), kept to show that :func:`subspace_angle` equals it."""
    U = torch.linalg.svd(X.double(), full_matrices=False)[0][:, :r_max]
    Ut = torch.linalg.svd(Xt.double(), full_matrices=False)[0][:, :r_max]
    return math.degrees(torch.arccos(torch.linalg.svdvals(U.T @ Ut).clamp(-1, 1)).sum().item())


def hidden0_angle(X: torch.Tensor, Xt: torch.Tensor) -> float:
    """Angle in degrees between hidden unit 0 across prompts, ablated vs not (the released code)."""
    a = torch.nn.functional.normalize(X[:, 0].double(), dim=0)
    b = torch.nn.functional.normalize(Xt[:, 0].double(), dim=0)
    return math.degrees(torch.arccos((a @ b).abs().clamp(-1, 1)).item())


def head_scores(X: torch.Tensor, Xt: torch.Tensor, kl: torch.Tensor, r_max: int = 1) -> dict[str, float]:
    """All three scores of one head from the unablated X, the ablated X̃ and its per-prompt KL."""
    return {"kl": kl.double().mean().item(), "subspace": subspace_angle(X, Xt, r_max),
            "hidden0_angle": hidden0_angle(X, Xt)}


def head_key(layer: int, head: int) -> str:
    return f"{layer}-{head}"


def parse_key(key: str) -> Head:
    """'12-3' → (12, 3)."""
    try:
        layer, head = key.split("-")
        return int(layer), int(head)
    except ValueError:
        raise ValueError(f"head key {key!r}: expected '<layer>-<head>'") from None


def select_heads(scores: Mapping[str, float], top_h: int) -> list[Head]:
    """Global top-``top_h`` heads by score, descending; ties keep layer-major order."""
    if top_h < 1:
        raise ValueError(f"top_h = {top_h}: must be ≥ 1")
    heads = sorted((parse_key(k) for k in scores), key=lambda lh: lh)  # layer-major
    ranked = sorted(heads, key=lambda lh: -scores[head_key(*lh)])  # stable: ties stay layer-major
    return ranked[:top_h]


def ranks(scores: Mapping[str, float]) -> dict[str, int]:
    """Rank of every head (1 = highest score), ties broken layer-major."""
    return {head_key(*lh): i + 1 for i, lh in enumerate(select_heads(scores, len(scores)))}


def ordered(scores: Mapping[str, float]) -> dict[str, float]:
    """The scores in layer-major key order (the authors' file order)."""
    return {head_key(*lh): float(scores[head_key(*lh)]) for lh in sorted(parse_key(k) for k in scores)}


def dumps_authors(scores: Mapping[str, float]) -> str:
    """The authors' format: one JSON object on one line, ``{"<layer>-<head>": score}``, layer-major."""
    return json.dumps(ordered(scores))


def load_head_scores(path: str | os.PathLike) -> dict[str, float]:
    """Read head scores in the authors' format (.json or one-line .jsonl)."""
    text = Path(path).read_text().strip()
    try:
        obj = json.loads(text.splitlines()[0] if text else "")
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a one-line JSON object of head scores ({err})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object {{'<layer>-<head>': score}}")
    for k in obj:
        parse_key(k)
    return {k: float(v) for k, v in obj.items()}


def to_grid(scores: Mapping[str, float]) -> torch.Tensor:
    """Scores as a [layers, heads] tensor (NaN where a head has no score)."""
    heads = [parse_key(k) for k in scores]
    L, H = max(l for l, _ in heads) + 1, max(h for _, h in heads) + 1
    grid = torch.full((L, H), float("nan"))
    for (l, h) in heads:
        grid[l, h] = scores[head_key(l, h)]
    return grid


def table(scores: Mapping[str, float], extra: Mapping[str, Mapping[str, float]] | None = None):
    """Tidy DataFrame: layer, head, score, rank (+ one column per extra score variant)."""
    import pandas as pd

    rk = ranks(scores)
    rows = []
    for key, value in ordered(scores).items():
        layer, head = parse_key(key)
        row = {"layer": layer, "head": head, "score": value, "rank": rk[key]}
        for name, other in (extra or {}).items():
            row[name] = other.get(key, float("nan"))
        rows.append(row)
    return pd.DataFrame(rows)
