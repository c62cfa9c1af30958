"""The fast Ships engine and the naive loop it must equal (docs/method.md, "Speed").

Engine: the vision encoder and the unablated model run once per prompt (``decoder.trace``);
the decoder input of layer l is kept for every prompt, so ablating a head of layer l replays only
layers l..L−1, for several heads at once (one head per batch row); only the last position is
normed and projected to logits. Layers advance one at a time, so per-layer results can be saved
and a killed run resumes at the first layer without results.

Naive: one full forward per head per prompt.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .ablation import ablate, non_causal
from .decoder import finish, replay, trace
from .models import LoadedModel
from .progress import progress as progress_bar
from .ships import head_key, head_scores, kl_per_prompt


@dataclass(frozen=True)
class AblationConfig:
    """How heads are ablated and scored (the ``ships`` params)."""

    epsilon: float = 1e-5
    parts: tuple[str, ...] = ("q", "k", "v")
    gqa_slot_bug: bool = False
    non_causal: bool = False
    r_max: int = 1

    @classmethod
    def from_params(cls, P) -> "AblationConfig":
        s = P.ships
        return cls(s.epsilon, tuple(s.parts), s.gqa_slot_bug, s.non_causal, s.r_max)


LayerScores = dict[str, dict[str, float]]  # score name -> {"<layer>-<head>": value}


def _context(lm: LoadedModel, cfg: AblationConfig):
    return non_causal(lm) if cfg.non_causal else nullcontext()


def auto_batch(lm: LoadedModel, seq_len: int, n_heads: int) -> int:
    """Heads per batched replay: as many as a quarter of free memory holds (all heads on CPU
    up to 2 GiB of activations)."""
    geo = lm.geometry
    tc = lm.adapter.text_config(lm.model.config)
    width = 6 * geo.hidden_size + 3 * getattr(tc, "intermediate_size", 4 * geo.hidden_size) + geo.n_heads * seq_len
    per_row = seq_len * width * torch.finfo(lm.dtype).bits // 8
    if lm.device.type == "cuda":
        budget = torch.cuda.mem_get_info(lm.device)[0] // 4
    else:
        budget = 2 << 30
    return max(1, min(n_heads, budget // max(per_row, 1)))


def _layer_scores(layer: int, X: torch.Tensor, Xt: torch.Tensor, kl: torch.Tensor, r_max: int) -> LayerScores:
    out: LayerScores = {"kl": {}, "subspace": {}, "hidden0_angle": {}}
    for h in range(Xt.shape[0]):
        for name, value in head_scores(X, Xt[h], kl[h], r_max).items():
            out[name][head_key(layer, h)] = value
    return out


@torch.no_grad()
def ships_engine(lm: LoadedModel, prompts: Sequence[Any], cfg: AblationConfig = AblationConfig(),
                 batch_heads: int | str = "auto", done: dict[int, LayerScores] | None = None,
                 on_layer: Callable[[int, LayerScores], None] | None = None, progress: bool = True) -> LayerScores:
    """Scores of every head of every layer for the encoded ``prompts``.

    ``done`` maps layers already scored (a resumed run) to their scores; ``on_layer`` is called
    with each newly scored layer (to persist it).
    """
    geo = lm.geometry
    done = dict(done or {})
    with _context(lm, cfg):
        traces = [trace(lm, p, keep="first") for p in prompts]  # vision encoder: once per prompt
        states = [t.hidden[0] for t in traces]
        ref = [finish(lm, replay(lm, t, 0, h)) for t, h in zip(traces, states)]  # the unablated pass
        X = torch.cat([r[0] for r in ref]).float()
        P = torch.cat([r[1] for r in ref]).float()
        todo = [l for l in range(geo.n_layers) if l not in done]
        bar = progress_bar(total=len(todo) * len(prompts), desc="Ships", unit="prompt·layer", disable=not progress)
        for layer in range(geo.n_layers):
            if layer not in done and any(t.ran(layer) for t in traces):
                Xt = torch.zeros(geo.n_heads, len(prompts), X.shape[1])
                kl = torch.zeros(geo.n_heads, len(prompts), dtype=torch.float64)
                for n, (t, h0) in enumerate(zip(traces, states)):
                    B = batch_heads if isinstance(batch_heads, int) else auto_batch(lm, h0.shape[1], geo.n_heads)
                    for lo in range(0, geo.n_heads, B):
                        heads = range(lo, min(lo + B, geo.n_heads))
                        with ablate(lm, [[(layer, h)] for h in heads], cfg.epsilon, cfg.parts, cfg.gqa_slot_bug):
                            hid = replay(lm, t, layer, h0.expand(len(heads), *h0.shape[1:]))
                        fh, logits = finish(lm, hid)
                        Xt[lo:lo + len(heads), n] = fh.float()
                        kl[lo:lo + len(heads), n] = kl_per_prompt(P[n:n + 1].expand(len(heads), -1), logits)
                    bar.update(1)
                done[layer] = _layer_scores(layer, X, Xt, kl, cfg.r_max)
                if on_layer is not None:
                    on_layer(layer, done[layer])
            # advance every prompt's unablated state to the next layer's input
            states = [replay(lm, t, layer, h, stop=layer + 1) for t, h in zip(traces, states)]
        bar.close()
    return merge(done)


def merge(per_layer: dict[int, LayerScores]) -> LayerScores:
    """Per-layer results → one dict per score, layer-major."""
    out: LayerScores = {"kl": {}, "subspace": {}, "hidden0_angle": {}}
    for layer in sorted(per_layer):
        for name in out:
            out[name].update(per_layer[layer][name])
    return out


@torch.no_grad()
def _full(lm: LoadedModel, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """One complete forward: final-norm state and logits at the last position."""
    got = {}
    norm = lm.adapter.language_model(lm.model).norm
    handle = norm.register_forward_hook(lambda m, a, o: got.__setitem__("h", o[:, -1]))
    try:
        logits = lm.model(**inputs, use_cache=False).logits[:, -1]
    finally:
        handle.remove()
    return got["h"].float(), logits.float()


@torch.no_grad()
def ships_naive(lm: LoadedModel, prompts: Sequence[Any], cfg: AblationConfig = AblationConfig(),
                progress: bool = False) -> LayerScores:
    """The reference: one full forward (vision encoder included) per head per prompt."""
    geo = lm.geometry
    per_layer: dict[int, LayerScores] = {}
    with _context(lm, cfg):
        ref = [_full(lm, p) for p in prompts]
        X = torch.cat([r[0] for r in ref])
        P = torch.cat([r[1] for r in ref])
        for layer in progress_bar(range(geo.n_layers), desc="Ships (naive)", disable=not progress):
            Xt = torch.zeros(geo.n_heads, len(prompts), X.shape[1])
            kl = torch.zeros(geo.n_heads, len(prompts), dtype=torch.float64)
            for h in range(geo.n_heads):
                for n, p in enumerate(prompts):
                    with ablate(lm, [[(layer, h)]], cfg.epsilon, cfg.parts, cfg.gqa_slot_bug):
                        Xt[h, n], logits = _full(lm, p)
                    kl[h, n] = kl_per_prompt(P[n:n + 1], logits)[0]
            per_layer[layer] = _layer_scores(layer, X, Xt, kl, cfg.r_max)
    return merge(per_layer)
