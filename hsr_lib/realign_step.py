"""The realignment step (notebook 05): pick the heads, compute the restored set R of every
attention linear of their layers, and save what rebuilds the realigned model from the dense
checkpoint (DESIGN §9):

``realign/mask.safetensors``      the realigned mask (bit-packed, True = still pruned)
``realign/restored.safetensors``  flat indices of the restored entries, per module
``realign/modules.csv``           per module: |P|, |T(S,q)|, |T(U,p_max) \\ T(U,p)|, |F|, |P ∩ region|, |R|
``realign/heads.csv``             per selected head: restored entries inside its own region
``realign/summary.json``          variant, heads, totals, restored ratio in ‱

Restored weights take their dense values. After SparseGPT, which also changed the surviving
weights, a realigned model is the pruned model (updated survivors included) with the entries of R
set back to their dense values: the restored weights are dense ones sitting among OBS-updated
neighbours, exactly as in the released code.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import torch

from .adapters import Geometry, adapter_for
from .io import atomic_write_json, atomic_write_text, read_json
from .masks import atomic_save_safetensors, load_masks, mask_shapes, rewrite_masks
from .models import LoadedModel, load_from_params, model_config
from .prune import build_pruned, load_mask, prune_step
from .realign import candidate_sets, head_region, module_kind, random_heads, rederived_mask, restore_set
from .runs import Run
from .scores import load_scores, score_step
from .ships import Head, head_key, select_heads
from .ships_step import run_ships


def choose_heads(run: Run, geo: Geometry) -> list[Head]:
    """The heads realignment works inside: the Ships top-h (hsr, hsr_a) or a seeded random draw."""
    R = run.params.realign
    if R.variant == "random_heads":
        return random_heads(geo, R.top_h, R.seed)
    scores = run_ships(run).scores
    if R.top_h > len(scores):
        raise ValueError(f"realign.top_h = {R.top_h} but the model has only {len(scores)} heads")
    return select_heads(scores, R.top_h)


def realign_step(run: Run, progress: bool = True) -> dict:
    """Compute (or reuse) the realignment of ``run``; returns its summary."""
    P, R = run.params, run.params.realign
    config = model_config(P.model.name, P.seed)
    adapter = adapter_for(config, P.model.family)
    geo = adapter.geometry(config)
    heads = choose_heads(run, geo)  # runs (or reuses) Ships when needed
    score_step(run, progress=progress)
    prune_step(run, progress=progress)
    if run.is_done("realign"):
        return read_json(run.step_dir("realign") / "summary.json")
    with run.step("realign") as d:
        summary = _realign(run, adapter, config, geo, heads, d)
    if R.save_model:  # rebuilt from the finished step's artifacts
        save_realigned(run, d / "model")
    return summary


def _realign(run: Run, adapter, config, geo: Geometry, heads: list[Head], d: Path) -> dict:
    """The body of the step: R per module, then the artifacts in ``d``."""
    P, R = run.params, run.params.realign
    by_layer: dict[int, list[int]] = defaultdict(list)
    for layer, h in heads:
        by_layer[layer].append(h)
    mask_file = run.step_dir("prune") / "mask.safetensors"
    total_params = sum(math.prod(shape) for shape in mask_shapes(mask_file).values())
    realigned: dict[str, torch.Tensor] = {}  # only the modules that change; the rest are copied packed
    restored: dict[str, torch.Tensor] = {}
    rows, head_rows = [], []
    for name in adapter.prunable_names(config):
        layer, kind = int(name.split(".")[1]), module_kind(name)
        if layer not in by_layer or kind not in ("q_proj", "k_proj", "v_proj", "o_proj"):
            continue
        actual = load_mask(run, [name])[name]
        S = load_scores(run, "safety", keys=[name])[name].float()
        U = load_scores(run, "utility", keys=[name])[name].float()
        base = actual if R.base_mask == "actual" else rederived_mask(U, P.pruning.sparsity)
        region = head_region(kind, tuple(S.shape), geo, by_layer[layer], R.region)
        safety, band = candidate_sets(S, U, R.p, R.q, R.p_max)  # the three selections, once
        F = safety & band
        Rset = restore_set(base, S, U, region, R.variant, R.p, R.q, R.p_max, F=F)
        realigned[name] = actual & ~Rset
        if Rset.any():
            restored[name] = torch.nonzero(Rset.reshape(-1)).squeeze(1)
        rows.append({"module": name, "layer": layer, "kind": kind, "params": S.numel(),
                     "pruned": int(base.sum()), "top_q_safety": int(safety.sum()), "utility_band": int(band.sum()),
                     "F": int(F.sum()), "pruned_in_region": int((base & region).sum()), "restored": int(Rset.sum()),
                     "newly_nonzero": int((Rset & actual).sum())})
        for h in by_layer[layer]:
            own = head_region(kind, tuple(S.shape), geo, [h], "paper")
            head_rows.append({"layer": layer, "head": h, "kind": kind, "restored": int((Rset & own).sum())})
    n_restored = sum(r["restored"] for r in rows)
    meta = {"variant": R.variant, "fidelity": P.fidelity, "region": R.region, "base_mask": R.base_mask,
            "model": P.model.name}
    rewrite_masks(mask_file, d / "mask.safetensors", realigned, {**meta, "true_means": "pruned"})
    atomic_save_safetensors(d / "restored.safetensors", restored or {"_none": torch.zeros(0, dtype=torch.long)}, meta)
    _write_csv(d / "modules.csv", rows)
    _write_csv(d / "heads.csv", _sum_heads(head_rows))
    summary = {**meta, "heads": [head_key(*h) for h in heads], "top_h": R.top_h, "p": R.p, "q": R.q,
               "p_max": R.p_max, "restored": n_restored, "newly_nonzero": sum(r["newly_nonzero"] for r in rows),
               "decoder_linear_params": total_params, "restored_ratio_permyriad": n_restored / total_params * 1e4,
               "pruning_method": P.pruning.method, "sparsity": P.pruning.sparsity}
    atomic_write_json(d / "summary.json", summary)
    return summary


def _sum_heads(rows: list[dict]) -> list[dict]:
    """Per head: restored entries in q, k, v, o and in all."""
    out: dict[tuple[int, int], dict] = {}
    for r in rows:
        row = out.setdefault((r["layer"], r["head"]), {"layer": r["layer"], "head": r["head"], "q_proj": 0,
                                                        "k_proj": 0, "v_proj": 0, "o_proj": 0})
        row[r["kind"]] += r["restored"]
    for row in out.values():
        row["total"] = row["q_proj"] + row["k_proj"] + row["v_proj"] + row["o_proj"]
    return [out[k] for k in sorted(out)]


def _write_csv(path: Path, rows: list[dict]) -> None:
    import pandas as pd

    atomic_write_text(path, pd.DataFrame(rows).to_csv(index=False))


def load_restored(run: Run) -> dict[str, torch.Tensor]:
    """Flat indices of the restored entries, per module."""
    from safetensors.torch import load_file

    path = run.step_dir("realign") / "restored.safetensors"
    if not run.recorded("realign"):
        raise FileNotFoundError(f"{path}: the realignment step has not finished; run notebook 05 first")
    return {k: v for k, v in load_file(str(path)).items() if k != "_none"}


@torch.no_grad()
def build_realigned(run: Run, lm: LoadedModel | None = None) -> LoadedModel:
    """The realigned model: dense checkpoint + pruning artifacts, then the restored entries set
    back to their dense values (``lm``, if given, must hold the dense weights; it is modified)."""
    restored = load_restored(run)
    lm = lm or load_from_params(run.params)
    lins = lm.prunable_linears()
    dense = {name: lins[name].weight.view(-1)[idx].clone() for name, idx in restored.items()}
    build_pruned(run, lm)
    for name, idx in restored.items():
        lins[name].weight.view(-1)[idx] = dense[name]
    return lm


def save_realigned(run: Run, path: str | Path | None = None) -> Path:
    """Rebuild the realigned model and save it as an HF model directory."""
    from .prune import _save_dir

    return _save_dir(build_realigned(run), Path(path) if path else run.step_dir("realign") / "model")


def realigned_mask(run: Run) -> dict[str, torch.Tensor]:
    """The realigned mask (True = still pruned), per module."""
    return load_masks(run.step_dir("realign") / "mask.safetensors")

