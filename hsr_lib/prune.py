"""Pruning with Wanda, SparseGPT or SNIP, unstructured or N:M, calibrated on the utility set (DESIGN §8).

Sequential (``pruning.sequential``, the default): layer i is calibrated on the outputs of the
already pruned layers 0..i-1. Wanda and SparseGPT gather the statistics of all of a layer's
linears in one pass of the dense layer, prune them, then run the pruned layer once more to make
the next layer's inputs (as the released code does). SNIP's gradient at layer i runs through the
dense layers above it; sequential SNIP therefore repeats its forward/backward from layer i for
every i (cost ~L/2 times one SNIP pass); ``sequential: false`` is one-shot SNIP on the dense model,
as SNIP and the released code do. Wanda and SNIP only zero weights; SparseGPT also updates the
survivors.

Artifacts in ``<run>/prune/``: ``mask.safetensors`` (bit-packed, True = pruned; :mod:`hsr_lib.masks`),
``weights.safetensors`` (SparseGPT only: the updated weights of every pruned module), ``sparsity.csv``
(per module, per layer, total), ``summary.json`` and, with ``pruning.save_model``, ``model/``.
:func:`build_pruned` rebuilds the pruned model from the dense checkpoint plus these artifacts.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .calibration import Calibration, _progress, build, layer_linears, layer_on_device, load_for_calibration, run_layer
from .data import Sample
from .io import atomic_write_json, atomic_write_text, read_json
from .masks import atomic_save_safetensors, load_masks, mask_metadata, mask_shapes, save_masks
from .models import LoadedModel, load_from_params
from .prompts import encode_prompt
from .runs import Run
from .scores import InputStats, check_method, snip_score, wanda_score
from .snip import abs_gradients
from .sparsegpt import inverse_cholesky, parse_pattern, sparsegpt_prune


def check_sparsity(sparsity: float, pattern: str) -> tuple[int, int] | None:
    """Refuse a sparsity outside [0, 1) or one that does not match an N:M pattern; the parsed pattern."""
    nm = parse_pattern(pattern)
    if not 0 <= sparsity < 1:
        raise ValueError(f"pruning sparsity must be in [0, 1) (got {sparsity})")
    if nm is not None and abs(sparsity - nm[0] / nm[1]) > 1e-9:
        raise ValueError(f"pruning pattern {pattern!r} needs sparsity {nm[0] / nm[1]} (got {sparsity})")
    return nm


def prune_mask(scores: torch.Tensor, sparsity: float, pattern: str = "unstructured") -> torch.Tensor:
    """True where a weight is pruned: per row the ``int(in·s)`` lowest scores (stable ascending
    sort), or under N:M the N lowest of every block of M consecutive inputs of a row."""
    nm = check_sparsity(sparsity, pattern)
    rows, cols = scores.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=scores.device)
    if nm is None:
        k = int(cols * sparsity)
        if k:  # = the first k of a stable ascending sort, in linear time: below the k-th value, then ties by column
            kth = scores.kthvalue(k, dim=1, keepdim=True).values
            below, tie = scores < kth, scores == kth
            mask = below | (tie & (tie.cumsum(1) <= k - below.sum(1, keepdim=True)))
        return mask
    n, m = nm
    if cols % m:
        raise ValueError(f"pattern {pattern!r} needs in_features ({cols}) divisible by {m}")
    order = torch.argsort(scores.reshape(rows, cols // m, m), dim=2, stable=True)[..., :n]
    return mask.view(rows, cols // m, m).scatter_(2, order, True).view(rows, cols)


@dataclass
class PruneResult:
    """Masks (True = pruned, CPU), SparseGPT's updated weights, and the damping each module needed."""

    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    damping: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def _zero(lin: torch.nn.Linear, mask: torch.Tensor) -> None:
    lin.weight.masked_fill_(mask.to(lin.weight.device), 0)


@torch.no_grad()
def _prune_stats_layer(lm: LoadedModel, cal: Calibration, method: str, sparsity: float, pattern: str,
                       blocksize: int, percdamp: float, res: PruneResult, dense_outputs: bool) -> list[torch.Tensor]:
    """Wanda/SparseGPT on the current layer of ``cal``: gather, prune; the dense layer's outputs if asked."""
    stats = InputStats(sq=method == "wanda", xtx=method == "sparsegpt")
    outs = run_layer(lm, cal, stats.add, outputs=dense_outputs)
    hinv: dict[str, tuple[torch.Tensor, float]] = {}  # per input group: inverse_cholesky(H)
    for name, lin in layer_linears(lm, cal.layer).items():
        width = lin.weight.shape[1]
        if method == "wanda":
            mask = prune_mask(wanda_score(lin.weight, stats.mean_sq(name, cal.n_samples, width)), sparsity, pattern)
            _zero(lin, mask)
        else:
            key = stats.key(name)
            if key not in hinv:
                hinv[key] = inverse_cholesky(stats.hessian(name, cal.n_samples, width).to(lin.weight.device),
                                             percdamp, name)
            W, mask, pd = sparsegpt_prune(lin.weight, None, sparsity, pattern, blocksize, percdamp, name, hinv[key])
            lin.weight.copy_(W)
            res.weights[name] = W.cpu()
            res.damping[name] = pd
        res.masks[name] = mask.cpu()
    return outs


def prune_model(lm: LoadedModel, samples: Sequence[Sample], method: str = "wanda", sparsity: float = 0.5,
                pattern: str = "unstructured", fidelity: str = "paper", sequential: bool = True,
                blocksize: int = 128, percdamp: float = 0.01, batch_size: int = 1, offload: bool = False,
                progress: bool = True) -> PruneResult:
    """Prune ``lm`` in place, calibrated on ``samples``; returns the masks (and SparseGPT's weights)."""
    check_method(method)
    check_sparsity(sparsity, pattern)
    res = PruneResult()
    n_layers = len(lm.layers)
    cal = build(lm, samples, fidelity, 1 if method == "snip" else batch_size, progress)
    if method == "snip" and not sequential:
        grads = abs_gradients(lm, cal, offload=offload, progress=progress)
        masks = {name: prune_mask(snip_score(lin.weight, grads.pop(name)), sparsity, pattern)
                 for name, lin in lm.prunable_linears().items()}
        for name, lin in lm.prunable_linears().items():
            _zero(lin, masks[name])
            res.masks[name] = masks[name].cpu()
        return res
    for i in _progress(range(n_layers), progress, desc=f"prune {method}"):
        more = i < n_layers - 1  # the last layer's outputs feed nothing
        if method == "snip":
            grads = abs_gradients(lm, cal, layers=[i], offload=offload, progress=False)
            with layer_on_device(lm, i, offload):
                for name, lin in layer_linears(lm, i).items():
                    mask = prune_mask(snip_score(lin.weight, grads.pop(name)), sparsity, pattern)
                    _zero(lin, mask)
                    res.masks[name] = mask.cpu()
                outs = run_layer(lm, cal, outputs=more)
        else:
            with layer_on_device(lm, i, offload):
                outs = _prune_stats_layer(lm, cal, method, sparsity, pattern, blocksize, percdamp, res,
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


def prune_step(run: Run, lm: LoadedModel | None = None, progress: bool = True) -> dict:
    """The prune step on the utility calibration set; returns its summary (reused when done)."""
    from .datastep import prepare_data

    P, pp = run.params, run.params.pruning
    check_method(pp.method)
    check_sparsity(pp.sparsity, pp.pattern)
    sets = prepare_data(run)
    if run.is_done("prune"):
        return read_json(run.step_dir("prune") / "summary.json")
    samples = sets.load("scores_utility")
    lm = lm or load_for_calibration(P)
    with run.step("prune") as d:
        t0 = time.perf_counter()
        res = prune_model(lm, samples, pp.method, pp.sparsity, pp.pattern, P.fidelity, pp.sequential, pp.blocksize,
                          pp.percdamp, P.scores.batch_size, P.scores.offload_layers, progress)
        wall = round(time.perf_counter() - t0, 3)
        meta = {"method": pp.method, "pattern": pp.pattern, "sparsity": str(pp.sparsity),
                "sequential": str(pp.sequential), "fidelity": P.fidelity, "model": P.model.name}
        save_masks(d / "mask.safetensors", res.masks, {**meta, "true_means": "pruned"})
        if res.weights:
            atomic_save_safetensors(d / "weights.safetensors", res.weights, meta)
        else:
            (d / "weights.safetensors").unlink(missing_ok=True)
        report = sparsity_report(lm, res.masks)
        atomic_write_text(d / "sparsity.csv", report.to_csv(index=False))
        raised = {k: v for k, v in res.damping.items() if v != pp.percdamp}
        summary = {**meta, "sparsity": pp.sparsity, "sequential": pp.sequential, "n_samples": len(samples),
                   "ids": [s.id for s in samples], "wall_s": wall,
                   "sparsity_reached": float(report[report.level == "total"].sparsity.iloc[0]),
                   "weights_file": bool(res.weights), "damping_raised": raised}
        if pp.save_model:
            _save_dir(lm, d / "model")
            summary["model_dir"] = str(d / "model")
        atomic_write_json(d / "summary.json", summary)
    return summary


def _save_dir(lm: LoadedModel, path: Path) -> Path:
    """Save ``lm`` as an HF model directory via a temporary sibling folder and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    lm.save(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def _prune_file(run: Run, name: str) -> Path:
    path = run.step_dir("prune") / name
    if not path.exists():
        raise FileNotFoundError(f"{path}: no pruning artifacts; run the prune step (notebook 04) first")
    return path


def load_mask(run: Run, keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """The pruned model's actual mask P (True = pruned), per module ``layers.{i}.{module}``."""
    return load_masks(_prune_file(run, "mask.safetensors"), list(keys) if keys is not None else None)


def load_pruned_weights(run: Run) -> dict[str, torch.Tensor]:
    """SparseGPT's updated weights per module ({} for Wanda and SNIP, whose survivors keep dense values)."""
    from safetensors.torch import load_file

    path = run.step_dir("prune") / "weights.safetensors"
    return load_file(str(path)) if path.exists() else {}


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


def build_pruned(run: Run, lm: LoadedModel | None = None) -> LoadedModel:
    """The pruned model: the dense checkpoint of ``run.params`` (or ``lm``, modified in place) plus
    the run's prune artifacts."""
    meta = mask_metadata(_prune_file(run, "mask.safetensors"))
    if meta.get("model") not in (None, run.params.model.name):
        raise ValueError(f"the run's mask was made for {meta['model']!r}, not {run.params.model.name!r}")
    lm = lm or load_from_params(run.params)
    weights = load_pruned_weights(run)
    for name in mask_shapes(_prune_file(run, "mask.safetensors")):  # one module's mask unpacked at a time
        apply_pruning(lm, load_mask(run, [name]), {name: weights[name]} if name in weights else None)
    return lm


def save_pruned(run: Run, path: str | os.PathLike | None = None) -> Path:
    """Rebuild the pruned model and save it as an HF model directory (default ``<run>/prune/model``)."""
    return _save_dir(build_pruned(run), Path(path) if path else run.step_dir("prune") / "model")


def heldout_utility(run: Run, n: int = 8) -> list[Sample]:
    """Up to ``n`` utility samples that pruning did not calibrate on (for held-out loss)."""
    from .datastep import prepare_data

    sets = prepare_data(run)
    used = {s.id for s in sets.load("scores_utility")}
    return [s for s in sets.load("utility") if s.id not in used][:n]


@torch.no_grad()
def greedy_answers(lm: LoadedModel, samples: Sequence[Sample], max_new_tokens: int = 32) -> list[str]:
    """Greedy answers of ``lm`` to the samples' prompts, one at a time (a before/after look)."""
    tok = lm.processor.tokenizer
    out = []
    for s in samples:
        enc = encode_prompt(lm.processor, s, lm.adapter, lm.device)
        ids = lm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        out.append(tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out
