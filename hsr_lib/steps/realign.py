"""The realignment step (notebook 05): pick the heads, compute the restored set R of every
attention linear of their layers, and save what rebuilds the realigned model from the dense
checkpoint (docs/method.md), into ``realign/<variant>-p<p>-q<q>-pmax<p_max>-h<top_h>[-s<seed>]-<hash>/``:

``mask.safetensors``      the realigned mask (bit-packed, True = still pruned)
``restored.safetensors``  flat indices of the restored entries R, per module
``modules.csv``           per module: |P|, |T(S,q)|, |T(U,p_max) \\ T(U,p)|, |F|, |P ∩ region|, |R|, |R ∩ actual|
``heads.csv``             restored entries per unit they can be attributed to (see :func:`attribution`)
``summary.json``          variant, heads, counts and ratios in ‱ (below)
``model/``                with ``realign.save_model``: the realigned model as an HF model directory

What the counts mean. ``restored`` = |R|, R taken against the base mask P (the actual mask in
``paper`` mode, the re-derived one in ``reference`` mode): the paper's ‱ is |R| / (language-model
decoder linear parameters) · 1e4. ``newly_nonzero`` = |R ∩ actual mask|: the weights that are
zero in the pruned model and non-zero after realignment (equal to ``restored`` in ``paper``
mode). ``survivors_overwritten`` = |R \\ actual|: weights the pruned model kept that realignment
sets to their dense values (only in ``reference`` mode); ``survivors_changed`` counts those whose
value actually changes (after SparseGPT, whose survivors are OBS-updated; 0 after Wanda and SNIP).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters import ATTN_PARTS, Geometry
from ..io import atomic_write_json, atomic_write_text, read_json
from ..masks import atomic_save_safetensors, load_masks, pack, rewrite_masks, save_packed
from ..models import LoadedModel, load_from_params, save_model_dir
from ..params import Params
from ..realign import candidate_sets, head_region, module_kind, random_heads, rederived_mask, restore_set
from ..runs import Run, Spec
from ..ships import Head, head_key
from . import prune, scores, ships
from .base import Result, ensure, finished, geometry, repair_export, requirements

NAME = "realign"


@dataclass
class RealignResult(Result):
    """A finished realignment: R per module, the realigned mask, and the model it rebuilds."""

    pruned: prune.PruneResult | None = None

    def restored(self) -> dict[str, torch.Tensor]:
        """Flat indices of the restored entries, per module (modules with none left out)."""
        from safetensors.torch import load_file

        return {k: v for k, v in load_file(str(self.dir / "restored.safetensors")).items() if k != "_none"}

    def mask(self, keys=None) -> dict[str, torch.Tensor]:
        """The realigned mask (True = still pruned), per module."""
        return load_masks(self.dir / "mask.safetensors", keys)

    def modules(self):
        import pandas as pd

        return pd.read_csv(self.dir / "modules.csv")

    def heads(self):
        import pandas as pd

        return pd.read_csv(self.dir / "heads.csv")

    def base_mask(self, keys=None) -> dict[str, torch.Tensor]:
        """P, the base mask R was taken from (True = pruned): the re-derived mask in ``reference``
        mode (``base_mask.safetensors``), the pruning mask otherwise."""
        path = self.dir / "base_mask.safetensors"
        return load_masks(path, keys) if path.exists() else self.pruned.mask(keys)

    @torch.no_grad()
    def build(self, lm: LoadedModel | None = None) -> LoadedModel:
        """The realigned model, from the dense checkpoint (``lm``, if given, must hold the dense
        weights; it is modified). ``base_mask: actual``: the pruned model rebuilt, then R set back
        to its dense values. ``base_mask: rederived`` (the released code): the dense weights with
        the realigned mask ``P \\ R`` zeroed, in every module."""
        lm = lm or load_from_params(self.pruned.params)
        lins = lm.prunable_linears()
        if self.summary.get("built_from") == "dense":
            for name, mask in self.mask().items():
                lins[name].weight.masked_fill_(mask.to(lins[name].weight.device), 0)
            return lm
        restored = self.restored()
        dense = {name: lins[name].weight.view(-1)[idx].clone() for name, idx in restored.items()}
        self.pruned.build(lm)
        for name, idx in restored.items():
            lins[name].weight.view(-1)[idx] = dense[name]
        return lm

    def save_model(self, path: str | Path | None = None) -> Path:
        """Rebuild the realigned model and save it as an HF model directory (default ``<key>/model``)."""
        return save_model_dir(self.build(), Path(path) if path else self.dir / "model")


def spec(P: Params) -> Spec:
    """Realignment's key: its settings, the heads' source (Ships and its chosen score, or a seed),
    the scores of the pruning method and the pruning it restores."""
    R = P.realign
    reads = {"fidelity": P.fidelity, "variant": R.variant, "top_h": R.top_h, "p": R.p, "q": R.q,
             "p_max": R.p_max, "region": R.region, "base_mask": R.base_mask}
    upstream = [prune.spec(P), scores.spec(P)]
    label = f"{R.variant}-p{R.p:g}-q{R.q:g}-pmax{R.p_max:g}-h{R.top_h}"
    if R.variant == "random_heads":
        reads["seed"] = R.seed
        label += f"-s{R.seed}"
    else:
        reads["ships_score"] = P.ships.score
        upstream.append(ships.spec(P))
    return Spec(NAME, label, reads, upstream=tuple(upstream), params=P, runner=run)


def load(run: Run) -> RealignResult:
    """The finished realignment of ``run``'s params."""
    s = spec(run.params)
    d, summary = finished(run, s, "realignment")
    return RealignResult(d, s.key, summary, prune.load(run))


def choose_heads(run: Run, geo: Geometry) -> list[Head]:
    """The heads realignment works inside: the Ships top-h (hsr, hsr_a) or a seeded random draw."""
    R = run.params.realign
    if R.top_h > geo.n_heads_total:
        raise ValueError(f"realign.top_h = {R.top_h} but the model has only {geo.n_heads_total} heads")
    if R.variant == "random_heads":
        return random_heads(geo, R.top_h, R.seed)
    return ships.load(run).top(R.top_h)


def run(run: Run, *, upstream: str = "compute", progress: bool = True) -> RealignResult:
    """Compute (or reuse) the realignment of ``run``. With ``realign.save_model`` the model
    directory is part of the step (a finished step missing it gets it rebuilt)."""
    P, s = run.params, spec(run.params)
    ensure(run, requirements(s), upstream, progress)
    if run.is_done(s):
        return repair_export(run, s, load(run), P.realign.save_model)
    adapter, config, geo = geometry(P)
    heads = choose_heads(run, geo)
    with run.step(s) as d:
        _realign(run, adapter, config, geo, heads, d)
        if P.realign.save_model:
            res = RealignResult(d, s.key, read_json(d / "summary.json"), prune.load(run))
            save_model_dir(res.build(), d / "model")
    return load(run)


def attribution(kind: str, geo: Geometry, heads: list[int], mode: str) -> list[tuple[str, int, list[int]]]:
    """The disjoint units a module's restored weights are counted in, ``(unit, index, heads)``:
    a query head's own slice (``head``); k/v rows or bands shared by a KV group under GQA
    (``kv_group``, once per weight, not once per head of the group); and, in ``reference`` mode,
    o_proj, whose region is the whole matrix (``layer``)."""
    heads = sorted(set(heads))
    if kind == "o_proj" and mode == "reference":
        return [("layer", -1, heads)]
    if kind in ("k_proj", "v_proj") and geo.group_size > 1:
        groups: dict[int, list[int]] = defaultdict(list)
        for h in heads:
            groups[geo.kv_head(h)].append(h)
        return [("kv_group", g, hs) for g, hs in sorted(groups.items())]
    return [("head", h, [h]) for h in heads]


def _attribute(rows: list[dict], layer: int, kind: str, Rset: torch.Tensor, geo: Geometry, heads: list[int],
               mode: str) -> None:
    """Count ``Rset`` in each unit of :func:`attribution` (the units are disjoint and cover the region)."""
    for unit, index, hs in attribution(kind, geo, heads, mode):
        region = head_region(kind, tuple(Rset.shape), geo, hs, mode)
        rows.append({"layer": layer, "unit": unit, "index": index, "heads": " ".join(head_key(layer, h) for h in hs),
                     "kind": kind, "restored": int((Rset & region).sum())})


def _realign(run: Run, adapter, config, geo: Geometry, heads: list[Head], d: Path) -> None:
    """The body of the step: R per module, then the artifacts in ``d``.

    ``base_mask: actual``: P is the pruning mask and the realigned mask is ``P \\ R`` in the
    modules that restore (the others are copied still packed). ``base_mask: rederived`` (the
    released code): P is re-derived from the dense utility scores with the run's sparsity and
    pattern in *every* prunable module, saved as ``base_mask.safetensors``, and the realigned mask
    is ``P \\ R`` everywhere."""
    P, R = run.params, run.params.realign
    pruned, sc = prune.load(run), scores.load(run)
    rederive = R.base_mask == "rederived"
    by_layer: dict[int, list[int]] = defaultdict(list)
    for layer, h in heads:
        by_layer[layer].append(h)
    shapes = pruned.shapes()
    total_params = sum(math.prod(shape) for shape in shapes.values())
    sparsegpt_weights = pruned.summary.get("weights_file", False)
    realigned: dict[str, torch.Tensor] = {}  # only the modules that change; the rest are copied packed
    base_packed: dict[str, torch.Tensor] = {}  # rederived mode: P of every module, packed
    restored: dict[str, torch.Tensor] = {}
    overwritten: dict[str, torch.Tensor] = {}  # R \ actual: survivors set back to dense values
    rows, unit_rows = [], []
    for name in adapter.prunable_names(config):
        layer, kind = int(name.split(".")[1]), module_kind(name)
        restoring = layer in by_layer and kind in ATTN_PARTS
        if not (restoring or rederive):
            continue
        U = sc.load("utility", keys=[name])[name].float()
        base = rederived_mask(U, P.pruning.sparsity, P.pruning.pattern) if rederive else None
        if rederive:
            base_packed[name] = pack(base)
        if not restoring:
            realigned[name] = base_packed[name]  # nothing restored here: P \ R = P
            continue
        actual = pruned.mask([name])[name]
        base = actual if base is None else base
        S = sc.load("safety", keys=[name])[name].float()
        region = head_region(kind, tuple(S.shape), geo, by_layer[layer], R.region)
        safety, band = candidate_sets(S, U, R.p, R.q, R.p_max)  # the three selections, once
        F = safety & band
        Rset = restore_set(base, S, U, region, R.variant, R.p, R.q, R.p_max, F=F)
        realigned[name] = pack(base & ~Rset)
        if Rset.any():
            restored[name] = torch.nonzero(Rset.reshape(-1)).squeeze(1)
        if (Rset & ~actual).any():
            overwritten[name] = torch.nonzero((Rset & ~actual).reshape(-1)).squeeze(1)
        rows.append({"module": name, "layer": layer, "kind": kind, "params": S.numel(),
                     "pruned": int(base.sum()), "top_q_safety": int(safety.sum()), "utility_band": int(band.sum()),
                     "F": int(F.sum()), "pruned_in_region": int((base & region).sum()), "restored": int(Rset.sum()),
                     "newly_nonzero": int((Rset & actual).sum()), "survivors_overwritten": int((Rset & ~actual).sum())})
        _attribute(unit_rows, layer, kind, Rset, geo, by_layer[layer], R.region)
    n_restored = sum(r["restored"] for r in rows)
    newly = sum(r["newly_nonzero"] for r in rows)
    meta = {"variant": R.variant, "fidelity": P.fidelity, "region": R.region, "base_mask": R.base_mask,
            "model": P.model.name}
    if rederive:
        save_packed(d / "base_mask.safetensors", base_packed, shapes,
                    {**meta, "true_means": "pruned", "pattern": P.pruning.pattern, "sparsity": str(P.pruning.sparsity)})
        save_packed(d / "mask.safetensors", realigned, shapes, {**meta, "true_means": "pruned"})
    else:
        rewrite_masks(pruned.mask_path, d / "mask.safetensors", realigned, {**meta, "true_means": "pruned"})
    atomic_save_safetensors(d / "restored.safetensors", restored or {"_none": torch.zeros(0, dtype=torch.long)}, meta)
    _write_csv(d / "modules.csv", rows)
    _write_csv(d / "heads.csv", _units_table(unit_rows))
    changed = _survivors_changed(pruned, overwritten) if sparsegpt_weights else 0
    summary = {**meta, "heads": [head_key(*h) for h in heads], "top_h": R.top_h, "p": R.p, "q": R.q,
               "p_max": R.p_max, "seed": R.seed if R.variant == "random_heads" else None,
               "restored": n_restored, "newly_nonzero": newly,
               "survivors_overwritten": sum(r["survivors_overwritten"] for r in rows), "survivors_changed": changed,
               "decoder_linear_params": total_params,
               "restored_ratio_permyriad": n_restored / total_params * 1e4,
               "newly_nonzero_ratio_permyriad": newly / total_params * 1e4,
               "pruning_method": P.pruning.method, "sparsity": P.pruning.sparsity, "pattern": P.pruning.pattern,
               "prune_key": pruned.key, "built_from": "dense" if rederive else "pruned"}
    atomic_write_json(d / "summary.json", summary)


@torch.no_grad()
def _survivors_changed(pruned: prune.PruneResult, overwritten: dict[str, torch.Tensor]) -> int:
    """How many survivors in R \\ actual hold a value (SparseGPT's update) other than the dense one."""
    if not overwritten:
        return 0
    lins = load_from_params(pruned.params).prunable_linears()
    updated = pruned.weights(list(overwritten))
    n = 0
    for name, idx in overwritten.items():
        dense = lins[name].weight.detach().view(-1)[idx].float()
        n += int((updated[name].view(-1)[idx].float() != dense).sum())
    return n


def _units_table(rows: list[dict]):
    """One row per attribution unit: restored entries in q, k, v, o and in all."""
    import pandas as pd

    cols = ["layer", "unit", "index", "heads", *ATTN_PARTS, "total"]
    if not rows:
        return pd.DataFrame(columns=cols)
    t = pd.DataFrame(rows).pivot_table(index=["layer", "unit", "index", "heads"], columns="kind", values="restored",
                                       aggfunc="sum", fill_value=0).reset_index()
    for k in ATTN_PARTS:
        if k not in t:
            t[k] = 0
    t["total"] = t[list(ATTN_PARTS)].sum(axis=1)
    order = {"head": 0, "kv_group": 1, "layer": 2}
    t = t.assign(_o=t["unit"].map(order)).sort_values(["layer", "_o", "index"]).drop(columns="_o")
    return t[cols].reset_index(drop=True)


def _write_csv(path: Path, rows) -> None:
    import pandas as pd

    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    atomic_write_text(path, df.to_csv(index=False))
