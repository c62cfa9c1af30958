"""Pruning with Wanda, SparseGPT or SNIP, unstructured or N:M, calibrated on the utility set (docs/method.md).

Sequential (``pruning.sequential``, the default): layer i is calibrated on the outputs of the
already pruned layers 0..i-1. Wanda and SparseGPT gather the statistics of all of a layer's
linears in one pass of the dense layer, prune them, then run the pruned layer once more to make
the next layer's inputs (as the released code does). SNIP's gradient at layer i runs through the
dense layers above it; sequential SNIP therefore repeats its forward/backward from layer i for
every i (cost ~L/2 times one SNIP pass); ``sequential: false`` is one-shot SNIP on the dense model,
as SNIP and the released code do. Wanda and SNIP only zero weights; SparseGPT also updates the
survivors.

Pure: a model and samples in, masks (and SparseGPT's updated weights) out; :func:`apply_pruning`
puts masks on a dense model. The step that stores them for a run is :mod:`hsr_lib.steps.prune`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .calibration import Calibration, build, layer_linears, layer_on_device, run_layer
from .data import Sample
from .models import LoadedModel
from .progress import maybe
from .scores import InputStats, check_method, snip_score, wanda_score
from .snip import abs_gradients
from .sparsegpt import dead_inputs, inverse_cholesky, sparsegpt_prune
from .sparsity import Rule, rule


@dataclass
class Pruning:
    """What :func:`prune_model` returns: masks (True = pruned, CPU), SparseGPT's updated weights, and
    the damping each module needed. (The finished prune *step* is :class:`hsr_lib.steps.prune.PruneResult`.)"""

    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    damping: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def _zero(lin: torch.nn.Linear, mask: torch.Tensor) -> None:
    lin.weight.masked_fill_(mask.to(lin.weight.device), 0)


@torch.no_grad()
def _prune_stats_layer(lm: LoadedModel, cal: Calibration, method: str, mask_rule: Rule,
                       blocksize: int, percdamp: float, res: Pruning, dense_outputs: bool) -> list[torch.Tensor]:
    """Wanda/SparseGPT on the current layer of ``cal``: gather, prune; the dense layer's outputs if asked."""
    stats = InputStats(sq=method == "wanda", xtx=method == "sparsegpt")
    outs = run_layer(lm, cal, stats.add, outputs=dense_outputs)
    hinv: dict[str, tuple[torch.Tensor, float]] = {}  # per input group: inverse_cholesky(H)
    dead: dict[str, torch.Tensor] = {}
    for name, lin in layer_linears(lm, cal.layer).items():
        width = lin.weight.shape[1]
        if method == "wanda":
            mask = mask_rule.mask(wanda_score(lin.weight, stats.mean_sq(name, cal.n_samples, width)))
            _zero(lin, mask)
        else:
            key = stats.key(name)
            if key not in hinv:
                H = stats.hessian(name, cal.n_samples, width).to(lin.weight.device)
                hinv[key], dead[key] = inverse_cholesky(H, percdamp, name), dead_inputs(H)
            W, mask, pd = sparsegpt_prune(lin.weight, None, mask_rule, blocksize=blocksize, percdamp=percdamp,
                                          name=name, hinv=hinv[key], dead=dead[key])
            lin.weight.copy_(W)
            res.weights[name] = W.cpu()
            res.damping[name] = pd
        res.masks[name] = mask.cpu()
    return outs


def prune_model(lm: LoadedModel, samples: Sequence[Sample], method: str = "wanda", sparsity: float | Rule = 0.5,
                pattern: str = "unstructured", fidelity: str = "paper", sequential: bool = True,
                blocksize: int = 128, percdamp: float = 0.01, batch_size: int = 1, offload: bool = False,
                progress: bool = True) -> Pruning:
    """Prune ``lm`` in place, calibrated on ``samples``; returns the masks (and SparseGPT's weights).
    ``method``, ``sparsity`` and ``pattern`` are checked here, once (``sparsity`` may be a checked
    :class:`~hsr_lib.sparsity.Rule`)."""
    check_method(method)
    mask_rule = rule(sparsity, pattern)
    res = Pruning()
    n_layers = len(lm.layers)
    cal = build(lm, samples, fidelity, 1 if method == "snip" else batch_size, progress)
    if method == "snip" and not sequential:
        grads = abs_gradients(lm, cal, offload=offload, progress=progress)
        masks = {name: mask_rule.mask(snip_score(lin.weight, grads.pop(name)))
                 for name, lin in lm.prunable_linears().items()}
        for name, lin in lm.prunable_linears().items():
            _zero(lin, masks[name])
            res.masks[name] = masks[name].cpu()
        return res
    for i in maybe(range(n_layers), progress, desc=f"prune {method}"):
        more = i < n_layers - 1  # the last layer's outputs feed nothing
        if method == "snip":
            grads = abs_gradients(lm, cal, layers=[i], offload=offload, progress=False)
            with layer_on_device(lm, i, offload):
                for name, lin in layer_linears(lm, i).items():
                    mask = mask_rule.mask(snip_score(lin.weight, grads.pop(name)))
                    _zero(lin, mask)
                    res.masks[name] = mask.cpu()
                outs = run_layer(lm, cal, outputs=more)
        else:
            with layer_on_device(lm, i, offload):
                outs = _prune_stats_layer(lm, cal, method, mask_rule, blocksize, percdamp, res,
                                          dense_outputs=more and not sequential)
                if sequential and more:
                    outs = run_layer(lm, cal)
        if more:
            cal.advance(outs)
    return res


def sparsity_report(lm: LoadedModel, masks: dict[str, torch.Tensor]):
    """Sparsity reached per module, per layer and in total: pruned (mask) and zero weights."""
    import pandas as pd

    lins = lm.prunable_linears()
    rows = []
    for name, mask in masks.items():
        parts = name.split(".")
        rows.append({"level": "module", "name": name, "layer": int(parts[1]), "module": ".".join(parts[2:]),
                     "numel": mask.numel(), "pruned": int(mask.sum()), "zeros": int((lins[name].weight == 0).sum())})
    df = pd.DataFrame(rows)
    per_layer = df.groupby("layer", as_index=False)[["numel", "pruned", "zeros"]].sum()
    per_layer = per_layer.assign(level="layer", name=[f"layers.{i}" for i in per_layer.layer], module="")
    total = pd.DataFrame([{"level": "total", "name": "total", "layer": -1, "module": "",
                           **df[["numel", "pruned", "zeros"]].sum().to_dict()}])
    out = pd.concat([df, per_layer, total], ignore_index=True)[["level", "name", "layer", "module", "numel",
                                                               "pruned", "zeros"]]
    return out.assign(sparsity=out.pruned / out.numel)


@torch.no_grad()
def apply_pruning(lm: LoadedModel, masks: dict[str, torch.Tensor],
                  weights: dict[str, torch.Tensor] | None = None) -> LoadedModel:
    """Set the updated ``weights`` (if any) and zero the masked entries of ``lm``, in place."""
    lins = lm.prunable_linears()
    for name, mask in masks.items():
        if name not in lins or lins[name].weight.shape != mask.shape:
            raise ValueError(f"mask {name} {tuple(mask.shape)} does not fit the model "
                             f"({tuple(lins[name].weight.shape) if name in lins else 'no such module'})")
        W = lins[name].weight
        if weights and name in weights:
            W.copy_(weights[name].to(W.device, W.dtype))
        W.masked_fill_(mask.to(W.device), 0)
    return lm
