"""The prune step (notebook 04): prune the dense model with Wanda, SparseGPT or SNIP, calibrated on
the utility sample (docs/method.md), into ``prune/<method>-<sparsity>-<pattern>-<hash>/``:

``mask.safetensors``     bit-packed, True = pruned (:mod:`hsr_lib.masks`): the set P
``weights.safetensors``  SparseGPT only: the updated weights of every pruned module
``sparsity.csv``         sparsity reached per module, per layer and in total
``summary.json``         settings, samples, wall time, sparsity reached
``model/``               with ``pruning.save_model``: the pruned model as an HF model directory

Pruning calibrates itself: it reads the data sample, not the score files, so scoring another
method never re-prunes. :meth:`PruneResult.build` rebuilds the pruned model from the dense
checkpoint plus these artifacts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..calibration import load_for_calibration
from ..io import atomic_write_json, atomic_write_text
from ..masks import atomic_save_safetensors, load_masks, mask_metadata, mask_shapes, save_masks
from ..models import LoadedModel, load_from_params, save_model_dir
from ..params import Params
from ..prune import apply_pruning, prune_model, sparsity_report
from ..runs import Run, Spec
from ..sparsity import pattern_label
from . import data
from .base import Result, ensure, finished, model_reads, repair_export, requirements

NAME = "prune"


@dataclass
class PruneResult(Result):
    """A finished pruning: its mask P, SparseGPT's weights, and the model it rebuilds."""

    model_name: str = ""
    params: Params | None = None

    @property
    def mask_path(self) -> Path:
        return self.dir / "mask.safetensors"

    def mask(self, keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """The pruned model's actual mask P (True = pruned), per module ``layers.{i}.{module}``."""
        return load_masks(self.mask_path, list(keys) if keys is not None else None)

    def shapes(self) -> dict[str, list[int]]:
        """Every module's shape, read without unpacking a mask."""
        return mask_shapes(self.mask_path)

    def weights(self, keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """SparseGPT's updated weights per module ({} for Wanda and SNIP, whose survivors keep dense values)."""
        from safetensors import safe_open

        path = self.dir / "weights.safetensors"
        if not path.exists():
            return {}
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if keys is None or k in keys}

    def sparsity(self):
        """The sparsity report (``sparsity.csv``) as a DataFrame."""
        import pandas as pd

        return pd.read_csv(self.dir / "sparsity.csv")

    @torch.no_grad()
    def build(self, lm: LoadedModel | None = None) -> LoadedModel:
        """The pruned model: the dense checkpoint (or ``lm``, modified in place) plus these artifacts,
        one module's mask unpacked at a time."""
        meta = mask_metadata(self.mask_path)
        if meta.get("model") not in (None, self.model_name):
            raise ValueError(f"{self.mask_path}: this mask was made for {meta['model']!r}, not {self.model_name!r}")
        lm = lm or load_from_params(self.params)
        for name in self.shapes():
            apply_pruning(lm, self.mask([name]), self.weights([name]) or None)
        return lm

    def save_model(self, path: str | Path | None = None) -> Path:
        """Rebuild the pruned model and save it as an HF model directory (default ``<key>/model``)."""
        return save_model_dir(self.build(), Path(path) if path else self.dir / "model")


def spec(params: Params) -> Spec:
    """Pruning's key: the model, the utility sample and every pruning setting that changes the mask."""
    pruning = params.pruning
    reads = {"model": model_reads(params), "fidelity": params.fidelity,
             "samples": data.sample_fingerprint(params, "scores_utility"), "method": pruning.method,
             "sparsity": pruning.sparsity, "pattern": pruning.pattern, "sequential": pruning.sequential,
             "batch_size": params.scores.batch_size}
    if pruning.method == "sparsegpt":
        reads.update(blocksize=pruning.blocksize, percdamp=pruning.percdamp)
    label = f"{pruning.method}-{pruning.sparsity:g}-{pattern_label(pruning.pattern)}"
    return Spec(NAME, label, reads, needs=(data.spec(params),), params=params, runner=run)


def load(run: Run) -> PruneResult:
    """The finished pruning of ``run``'s params."""
    s = spec(run.params)
    d, summary = finished(run, s, "prune")
    return PruneResult(d, s.key, summary, run.params.model.name, run.params)


def run(run: Run, *, upstream: str = "compute", progress: bool = True, lm: LoadedModel | None = None) -> PruneResult:
    """Prune (or reuse the pruning of) ``run``; ``lm``, if given, is the dense model, pruned in place.
    With ``pruning.save_model`` the model directory is part of the step: a finished step missing
    it (a crash while saving, or the flag turned on later) gets it rebuilt from the artifacts."""
    params, pruning, s = run.params, run.params.pruning, spec(run.params)  # params were checked when loaded
    ensure(run, requirements(s), upstream, progress)
    if run.is_done(s):
        return repair_export(run, s, load(run), pruning.save_model)
    samples = data.load(run).load("scores_utility")
    lm = lm or load_for_calibration(params)
    with run.step(s) as d:
        t0 = time.perf_counter()
        res = prune_model(lm, samples, pruning.method, pruning.sparsity, pruning.pattern, params.fidelity,
                          pruning.sequential, pruning.blocksize, pruning.percdamp, params.scores.batch_size,
                          params.scores.offload_layers, progress)
        wall = round(time.perf_counter() - t0, 3)
        meta = {"method": pruning.method, "pattern": pruning.pattern, "sparsity": str(pruning.sparsity),
                "sequential": str(pruning.sequential), "fidelity": params.fidelity, "model": params.model.name}
        save_masks(d / "mask.safetensors", res.masks, {**meta, "true_means": "pruned"})
        if res.weights:
            atomic_save_safetensors(d / "weights.safetensors", res.weights, meta)
        report = sparsity_report(lm, res.masks)
        atomic_write_text(d / "sparsity.csv", report.to_csv(index=False))
        raised = {k: v for k, v in res.damping.items() if v != pruning.percdamp}
        summary = {**meta, "sparsity": pruning.sparsity, "sequential": pruning.sequential,
                   "n_samples": len(samples),
                   "ids": [x.id for x in samples], "wall_s": wall,
                   "sparsity_reached": float(report[report.level == "total"].sparsity.iloc[0]),
                   "weights_file": bool(res.weights), "damping_raised": raised}
        if pruning.save_model:
            save_model_dir(lm, d / "model")
        atomic_write_json(d / "summary.json", summary)
    return load(run)
