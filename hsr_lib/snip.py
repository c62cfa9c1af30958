"""SNIP gradients, layer by layer from the calibration cache (docs/method.md).

SNIP needs ``Σ_n |∂L_n/∂W|`` with ``L_n`` the mean cross-entropy over the response positions of
sample n. A whole-model backward would hold every layer's activations at once; instead, per
sample (batch size 1: the absolute value is taken per sample):

1. forward layers ``start..L-1`` without autograd, keeping each layer's input hidden state
   (one [T, D] tensor per layer and sample);
2. final norm and lm_head only at the labelled positions, the loss, its gradient with respect
   to the last hidden state;
3. backward one layer at a time from the top: recompute the layer from its kept input with
   autograd on, take the gradients with respect to its input (handed down) and, for the layers
   asked for, its linears' weights (their absolute values summed over samples, fp32).

Peak memory is one layer's activations plus the kept inputs; layers can stream from the CPU
(``offload``), visiting the device twice per call (forward, backward), not twice per sample.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from .calibration import Calibration, layer_linears, layer_on_device, loss_positions
from .models import LoadedModel
from .progress import maybe


def _out(x):
    """The hidden state of a decoder layer's output (a tensor or a tuple)."""
    return x[0] if isinstance(x, tuple) else x


def abs_gradients(lm: LoadedModel, cal: Calibration, layers: Iterable[int] | None = None, offload: bool = False,
                  progress: bool = True) -> dict[str, torch.Tensor]:
    """``Σ_n |∂L_n/∂W|`` (fp32) for every prunable linear of ``layers`` (default: every layer from
    ``cal.layer`` on), the loss taken through the model's layers ``cal.layer..L-1`` as they are now."""
    if any(b.size != 1 for b in cal.batches):
        raise ValueError("SNIP needs one sample per calibration batch (per-sample absolute gradients)")
    start, n_layers = cal.layer, len(lm.layers)
    collect = set(range(start, n_layers)) if layers is None else set(layers)
    if not collect or min(collect) < start or max(collect) >= n_layers:
        raise ValueError(f"SNIP layers {sorted(collect)} must lie in [{start}, {n_layers})")
    lowest = min(collect)
    stash = [[b.hidden] for b in cal.batches]
    with torch.no_grad():
        for i in maybe(range(start, n_layers), progress, desc="SNIP forward", leave=False):
            with layer_on_device(lm, i, offload) as layer:
                for b, kept in zip(cal.batches, stash):
                    kw = b.kwargs[i]
                    kept.append(kept[-1] if kw is None else _out(layer(kept[-1], **kw)))
    text = lm.adapter.language_model(lm.model)
    grads = []
    for b, kept in zip(cal.batches, stash):
        h = kept.pop().detach().requires_grad_(True)
        rows, pos, target = loss_positions(b)
        with torch.enable_grad():
            logits = lm.model.lm_head(text.norm(h[rows, pos])).float()
            (g,) = torch.autograd.grad(F.cross_entropy(logits, target), h)
        grads.append(g)
    acc: dict[str, torch.Tensor] = {}
    for i in maybe(range(n_layers - 1, lowest - 1, -1), progress, desc="SNIP backward", leave=False):
        with layer_on_device(lm, i, offload) as layer:
            lins = layer_linears(lm, i) if i in collect else {}
            weights = [lin.weight for lin in lins.values()]
            flags = [w.requires_grad for w in weights]
            for w in weights:
                w.requires_grad_(True)
            try:
                for bi, (b, kept) in enumerate(zip(cal.batches, stash)):
                    h_in, kw = kept.pop(), b.kwargs[i]
                    if kw is None:  # skipped layer: the gradient passes through unchanged
                        continue
                    need_input = i > lowest
                    with torch.enable_grad():
                        h = h_in.detach().requires_grad_(need_input)
                        out = _out(layer(h, **kw))
                        got = torch.autograd.grad(out, ([h] if need_input else []) + weights, grads[bi],
                                                  allow_unused=True)
                    if need_input:
                        grads[bi], got = got[0], got[1:]
                    for name, w, gw in zip(lins, weights, got):
                        g32 = torch.zeros_like(w, dtype=torch.float32) if gw is None else gw.float().abs()
                        acc[name] = acc[name] + g32 if name in acc else g32
            finally:
                for w, f in zip(weights, flags):
                    w.requires_grad_(f)
            if offload:
                acc.update({name: acc[name].cpu() for name in lins if name in acc})
    for i in collect:  # a layer no sample ran (e.g. Mllama cross-attention without images)
        for name, lin in layer_linears(lm, i).items():
            acc.setdefault(name, torch.zeros(lin.weight.shape, dtype=torch.float32, device=lin.weight.device))
    return acc
