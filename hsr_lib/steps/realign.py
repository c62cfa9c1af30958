"""The realignment step (notebook 05): pick the heads, compute the restored set R of every
attention linear of their layers, and save what rebuilds the realigned model from the dense
checkpoint (docs/method.md), into ``realign/<variant>-p<p>-q<q>-pmax<p_max>-h<top_h>[-s<seed>]-<hash>/``:

``mask.safetensors``      the realigned mask (bit-packed, True = still pruned)
``restored.safetensors``  flat indices of the restored entries R, per module
``modules.csv``           per module: |P|, |T(S,q)|, |T(U,p_max) \\ T(U,p)|, |F|, |P ∩ region|, |R|, |R ∩ actual|
``heads.csv``             restored entries per unit they can be attributed to (see :func:`hsr_lib.realign.attribution`)
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch

from ..adapters import ATTN_PARTS, Geometry
from ..io import atomic_write_json, atomic_write_text, read_json
from ..masks import atomic_save_safetensors, load_masks, pack, rewrite_masks, save_packed
from ..models import LoadedModel, load_from_params, save_model_dir
from ..params import Params
from ..progress import maybe
from ..realign import random_heads, realign_modules, survivors_changed, totals
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


def spec(params: Params) -> Spec:
    """Realignment's key: its settings, the heads' source (Ships and its chosen score, or a seed),
    the scores of the pruning method and the pruning it restores."""
    realign_params = params.realign
    reads = {"fidelity": params.fidelity, "variant": realign_params.variant, "top_h": realign_params.top_h,
             "p": realign_params.p, "q": realign_params.q, "p_max": realign_params.p_max,
             "region": realign_params.region, "base_mask": realign_params.base_mask}
    upstream = [prune.spec(params), scores.spec(params)]
    label = (f"{realign_params.variant}-p{realign_params.p:g}-q{realign_params.q:g}-pmax{realign_params.p_max:g}"
             f"-h{realign_params.top_h}")
    if realign_params.variant == "random_heads":
        reads["seed"] = realign_params.seed
        label += f"-s{realign_params.seed}"
    else:
        reads["ships_score"] = params.ships.score
        upstream.append(ships.spec(params))
    return Spec(NAME, label, reads, upstream=tuple(upstream), params=params, runner=run)


def load(run: Run) -> RealignResult:
    """The finished realignment of ``run``'s params."""
    s = spec(run.params)
    d, summary = finished(run, s, "realignment")
    return RealignResult(d, s.key, summary, prune.load(run))


def choose_heads(run: Run, geo: Geometry) -> list[Head]:
    """The heads realignment works inside: the Ships top-h (hsr, hsr_a) or a seeded random draw."""
    realign_params = run.params.realign
    if realign_params.top_h > geo.n_heads_total:
        raise ValueError(f"realign.top_h = {realign_params.top_h} but the model has only {geo.n_heads_total} heads")
    if realign_params.variant == "random_heads":
        return random_heads(geo, realign_params.top_h, realign_params.seed)
    return ships.load(run).top(realign_params.top_h)


def run(run: Run, *, upstream: str = "compute", progress: bool = True) -> RealignResult:
    """Compute (or reuse) the realignment of ``run``. With ``realign.save_model`` the model
    directory is part of the step (a finished step missing it gets it rebuilt)."""
    params, s = run.params, spec(run.params)
    ensure(run, requirements(s), upstream, progress)
    if run.is_done(s):
        return repair_export(run, s, load(run), params.realign.save_model)
    adapter, config, geo = geometry(params)
    heads = choose_heads(run, geo)
    with run.step(s) as d:
        _realign(run, adapter.prunable_names(config), geo, heads, d, progress)
        if params.realign.save_model:
            res = RealignResult(d, s.key, read_json(d / "summary.json"), prune.load(run))
            save_model_dir(res.build(), d / "model")
    return load(run)


class Lazy(Mapping[str, torch.Tensor]):
    """A read-only mapping of module names to tensors, each loaded when it is asked for (so a large
    model's masks and scores are never all in memory)."""

    def __init__(self, names: Sequence[str], get: Callable[[str], torch.Tensor]):
        self._names, self._get = list(names), get

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _realign(run: Run, names: Sequence[str], geo: Geometry, heads: list[Head], d: Path, progress: bool) -> None:
    """The body of the step: :func:`hsr_lib.realign.realign_modules` over the run's pruning mask and
    scores, one module at a time, then the artifacts in ``d``.

    ``base_mask: actual``: P is the pruning mask and the realigned mask is ``P \\ R`` in the
    modules that restore (the others are copied still packed). ``base_mask: rederived`` (the
    released code): P is re-derived from the dense utility scores with the run's sparsity and
    pattern in *every* prunable module, saved as ``base_mask.safetensors``, and the realigned mask
    is ``P \\ R`` everywhere."""
    params, realign_params = run.params, run.params.realign
    pruned, sc = prune.load(run), scores.load(run)
    rederive = realign_params.base_mask == "rederived"
    shapes = pruned.shapes()
    total_params = sum(math.prod(shape) for shape in shapes.values())
    realigned: dict[str, torch.Tensor] = {}  # packed, only the modules that change; the rest are copied packed
    base_packed: dict[str, torch.Tensor] = {}  # rederived mode: P of every module, packed
    restored: dict[str, torch.Tensor] = {}  # flat indices of R
    overwritten: dict[str, torch.Tensor] = {}  # R \ actual: survivors set back to dense values
    rows, unit_rows = [], []
    modules = realign_modules(
        Lazy(names, lambda n: pruned.mask([n])[n]), Lazy(names, lambda n: sc.load("safety", keys=[n])[n]),
        Lazy(names, lambda n: sc.load("utility", keys=[n])[n]), heads, geo, variant=realign_params.variant,
        p=realign_params.p, q=realign_params.q, p_max=realign_params.p_max, region=realign_params.region,
        base_mask=realign_params.base_mask, sparsity=params.pruning.sparsity, pattern=params.pruning.pattern)
    for m in maybe(modules, progress, desc="realign"):
        if rederive:
            base_packed[m.name] = pack(m.base)
        realigned[m.name] = base_packed[m.name] if m.restored is None else pack(m.mask)
        if m.restored is None:
            continue
        if m.restored.any():
            restored[m.name] = torch.nonzero(m.restored.reshape(-1)).squeeze(1)
        if m.counts["survivors_overwritten"]:
            actual = pruned.mask([m.name])[m.name]
            overwritten[m.name] = torch.nonzero((m.restored & ~actual).reshape(-1)).squeeze(1)
        rows.append(m.counts)
        unit_rows += m.units
    meta = {"variant": realign_params.variant, "fidelity": params.fidelity, "region": realign_params.region,
            "base_mask": realign_params.base_mask, "model": params.model.name}
    if rederive:
        save_packed(d / "base_mask.safetensors", base_packed, shapes,
                    {**meta, "true_means": "pruned", "pattern": params.pruning.pattern,
                     "sparsity": str(params.pruning.sparsity)})
        save_packed(d / "mask.safetensors", realigned, shapes, {**meta, "true_means": "pruned"})
    else:
        rewrite_masks(pruned.mask_path, d / "mask.safetensors", realigned, {**meta, "true_means": "pruned"})
    atomic_save_safetensors(d / "restored.safetensors", restored or {"_none": torch.zeros(0, dtype=torch.long)}, meta)
    _write_csv(d / "modules.csv", rows, MODULE_COLUMNS)
    _write_csv(d / "heads.csv", _units_table(unit_rows))
    changed = _survivors_changed(pruned, overwritten) if pruned.summary.get("weights_file", False) else 0
    summary = {**meta, "heads": [head_key(*h) for h in heads], "top_h": realign_params.top_h,
               "p": realign_params.p, "q": realign_params.q, "p_max": realign_params.p_max,
               "seed": realign_params.seed if realign_params.variant == "random_heads" else None,
               **totals(rows, total_params), "survivors_changed": changed, "decoder_linear_params": total_params,
               "pruning_method": params.pruning.method, "sparsity": params.pruning.sparsity,
               "pattern": params.pruning.pattern, "prune_key": pruned.key,
               "built_from": "dense" if rederive else "pruned"}
    atomic_write_json(d / "summary.json", summary)


MODULE_COLUMNS = ["module", "layer", "kind", "params", "pruned", "top_q_safety", "utility_band", "F",
                  "pruned_in_region", "restored", "newly_nonzero", "survivors_overwritten"]


@torch.no_grad()
def _survivors_changed(pruned: prune.PruneResult, overwritten: dict[str, torch.Tensor]) -> int:
    """:func:`hsr_lib.realign.survivors_changed` against the dense checkpoint and SparseGPT's weights."""
    if not overwritten:
        return 0
    lins = load_from_params(pruned.params).prunable_linears()
    return survivors_changed({n: lins[n].weight.detach() for n in overwritten}, pruned.weights(list(overwritten)),
                             overwritten)


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


def _write_csv(path: Path, rows, columns: list[str] | None = None) -> None:
    import pandas as pd

    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows, columns=columns)
    atomic_write_text(path, df.to_csv(index=False))
