"""Head ablation with forward hooks (docs/method.md): scale attention heads by ε, a different set of
heads in each batch row, in any family, inside plain forwards, layer replays or ``generate``.

Ablating head (l, h) with parts q, k, v multiplies
  q: head h's query slice of q_proj's output (bias included, before RoPE);
  k: the key slice of its KV head g = h // (H / H_kv) (under GQA this touches every head of the
     group: that is the method);
  v: head h's attention output, i.e. o_proj's input columns of head h. With ``gqa_slot_bug``
     (the released code, ``reference`` mode) slot g is scaled instead of slot h.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from .models import LoadedModel

PARTS = ("q", "k", "v")
Head = tuple[int, int]


def _scales(rows: Sequence[Sequence[int]], width: int, head_dim: int, eps: float, slot) -> torch.Tensor:
    """[B, width] of ones, ε on the slot(h) slice of each row's heads."""
    s = torch.ones(len(rows), width, dtype=torch.float64)
    for b, heads in enumerate(rows):
        for h in heads:
            j = slot(h)
            s[b, j * head_dim:(j + 1) * head_dim] = eps
    return s


def _apply(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Multiply the last dim of ``x`` [N, ..., width] by per-row ``scale`` [B, width]; N may be a
    multiple of B (Mllama's cross-attention keys: B · tiles rows)."""
    if x.shape[0] != scale.shape[0]:
        if x.shape[0] % scale.shape[0]:
            raise RuntimeError(f"ablation: a batch of {x.shape[0]} rows does not fit {scale.shape[0]} ablation rows")
        scale = scale.repeat_interleave(x.shape[0] // scale.shape[0], dim=0)
    s = scale.to(device=x.device, dtype=x.dtype)
    return x * s.view(s.shape[0], *([1] * (x.dim() - 2)), s.shape[1])


@contextmanager
def ablate(lm: LoadedModel, rows: Sequence[Sequence[Head]], epsilon: float = 1e-5,
           parts: Sequence[str] = PARTS, gqa_slot_bug: bool = False) -> Iterator[None]:
    """Within the block, batch row ``b`` runs with the heads ``rows[b]`` (a list of (layer, head))
    ablated; a row with no heads runs unchanged (bitwise). Every forward in the block must have
    ``len(rows)`` batch rows."""
    bad = set(parts) - set(PARTS)
    if bad or not parts:
        raise ValueError(f"ablation parts {list(parts)}: use a non-empty subset of {list(PARTS)}")
    if epsilon <= 0:
        raise ValueError(f"ablation epsilon {epsilon}: must be > 0")
    geo = lm.geometry
    by_layer: dict[int, list[list[int]]] = defaultdict(lambda: [[] for _ in rows])
    for b, heads in enumerate(rows):
        for layer, h in heads:
            if not (0 <= layer < geo.n_layers and 0 <= h < geo.n_heads):
                raise ValueError(f"head ({layer}, {h}) is outside the model's {geo.n_layers} layers × {geo.n_heads} heads")
            by_layer[layer][b].append(h)
    handles = []
    try:
        for layer, per_row in by_layer.items():
            attn = lm.adapter.attention(lm.model, layer)
            d = geo.head_dim
            if "q" in parts:
                sq = _scales(per_row, geo.n_heads * d, d, epsilon, lambda h: h)
                handles.append(attn.q_proj.register_forward_hook(lambda m, a, out, s=sq: _apply(out, s)))
            if "k" in parts:
                sk = _scales(per_row, geo.n_kv_heads * d, d, epsilon, geo.kv_head)
                handles.append(attn.k_proj.register_forward_hook(lambda m, a, out, s=sk: _apply(out, s)))
            if "v" in parts:
                slot = geo.kv_head if gqa_slot_bug else (lambda h: h)
                so = _scales(per_row, geo.n_heads * d, d, epsilon, slot)
                handles.append(attn.o_proj.register_forward_pre_hook(
                    lambda m, a, s=so: (_apply(a[0], s), *a[1:])))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def non_causal(lm: LoadedModel) -> Iterator[None]:
    """Run self-attention without the causal mask, as the released code did under SDPA (an
    explicit flag only; docs/fidelity.md). Needs ``attn_implementation='sdpa'`` and unpadded inputs."""
    if lm.model.config._attn_implementation != "sdpa":
        raise ValueError("ships.non_causal needs model.attn_implementation: sdpa")
    mods = [lm.adapter.attention(lm.model, i) for i in range(lm.geometry.n_layers)
            if i not in lm.geometry.cross_layers]
    old = [getattr(m, "is_causal", True) for m in mods]
    try:
        for m in mods:
            m.is_causal = False
        yield
    finally:
        for m, o in zip(mods, old):
            m.is_causal = o
