"""Record what a VLM's language-model decoder layers receive, then replay layers from there.

One full forward (vision encoder, projector, embeddings, rotary/M-RoPE positions, masks,
Mllama's cross-attention states) runs once per input; :func:`trace` keeps the hidden state
entering each decoder layer and the keyword arguments the layer got. :func:`replay` then runs
layers ``start..stop-1`` on any hidden state — e.g. a batch of copies of layer ``l``'s input,
each ablated differently — without touching the vision tower again. Ships (§6) and the layer-wise
calibration of the importance scores (§7) both build on this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .models import LoadedModel


@dataclass
class DecoderTrace:
    """Inputs of the decoder layers for one (batch of) input(s).

    ``hidden[i]`` is the hidden state entering layer ``i`` (None when not kept, or when the
    model skipped the layer, as Mllama does with its cross-attention layers on text-only input);
    ``kwargs[i]`` the keyword arguments layer ``i`` received (cache disabled); ``final`` the
    final-norm output and ``logits`` the logits at the last position (None after an early stop).
    """

    hidden: list[torch.Tensor | None]
    kwargs: list[dict[str, Any] | None]
    final: torch.Tensor | None = None
    logits: torch.Tensor | None = None

    @property
    def n_layers(self) -> int:
        return len(self.kwargs)

    def ran(self, layer: int) -> bool:
        """Whether the model ran ``layer`` for this input."""
        return self.kwargs[layer] is not None


@torch.no_grad()
def trace(lm: LoadedModel, inputs, keep: str = "all") -> DecoderTrace:
    """Run ``lm`` on ``inputs`` once and record every decoder layer's inputs.

    keep: "all" keeps each layer's input hidden state; "first" keeps only the first layer's and
    runs no decoder layer: each layer is replaced, for this one forward, by an identity that
    records the keyword arguments the model hands it. Layers can receive different ones (a
    sliding-window layer gets its own mask, Mllama skips cross-attention layers without images),
    so they are recorded per layer, never copied from layer 0.
    """
    if keep not in ("all", "first"):
        raise ValueError(f"keep={keep!r}: use 'all' or 'first'")
    layers = lm.layers
    n = len(layers)
    hidden: list[torch.Tensor | None] = [None] * n
    kwargs: list[dict[str, Any] | None] = [None] * n
    out: dict[str, torch.Tensor] = {}

    def record(i: int, args: tuple, kw: dict[str, Any]) -> torch.Tensor:
        h = args[0] if args else kw["hidden_states"]
        rest = {k: v for k, v in kw.items() if k != "hidden_states"}
        rest.update({k: None for k in ("past_key_values", "cache") if k in rest}, use_cache=False)
        kwargs[i] = rest
        if keep == "all" or i == 0:
            hidden[i] = h
        return h

    def identity(i: int):
        def forward(*args, **kw):
            return record(i, args, kw)
        return forward

    handles = []
    if keep == "first":
        for i, layer in enumerate(layers):
            layer.forward = identity(i)  # an instance attribute: nn.Module.__call__ calls it
    else:
        def pre_hook(i: int):
            def hook(module, args, kw) -> None:
                record(i, args, kw)
            return hook

        handles = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
        norm = lm.adapter.language_model(lm.model).norm
        handles.append(norm.register_forward_hook(lambda m, a, o: out.__setitem__("final", o)))
    try:
        res = lm.model(**inputs, use_cache=False, logits_to_keep=1)
        if keep == "all":
            out["logits"] = res.logits[:, -1]
    finally:
        for h in handles:
            h.remove()
        for layer in layers:
            layer.__dict__.pop("forward", None)
    return DecoderTrace(hidden, kwargs, out.get("final"), out.get("logits"))


@torch.no_grad()
def replay(lm: LoadedModel, tr: DecoderTrace, start: int, hidden: torch.Tensor, stop: int | None = None,
           layers: nn.ModuleList | None = None) -> torch.Tensor:
    """Run decoder layers ``start..stop-1`` (default: to the end) on ``hidden``.

    ``hidden`` may hold several rows (a batch of variants of one input); the recorded keyword
    arguments, made for one row, are broadcast to them.
    """
    layers = layers if layers is not None else lm.layers
    stop = tr.n_layers if stop is None else stop
    batch = hidden.shape[0]
    for i in range(start, stop):
        kw = tr.kwargs[i]
        if kw is None:
            continue
        out = layers[i](hidden, **lm.adapter.expand_layer_kwargs(kw, batch))
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


@torch.no_grad()
def finish(lm: LoadedModel, hidden: torch.Tensor, position: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Final norm and lm_head at one position only: ``(normed hidden [B, D], logits [B, V])``."""
    h = lm.adapter.language_model(lm.model).norm(hidden[:, position])
    return h, lm.model.lm_head(h)
