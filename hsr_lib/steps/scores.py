"""The scores step (notebook 03): Wanda / SparseGPT / SNIP importance of every prunable linear on
the dense model, on the safety set (S) and on the utility set (U) (docs/method.md).

Each method is its own keyed folder, ``scores/<method>-<hash>/`` with ``safety.safetensors``,
``utility.safetensors`` (one tensor per module, key ``layers.{i}.{module}``),
``tokens_safety.jsonl`` / ``tokens_utility.jsonl`` (per sample: the token ids, the response span
``[start, end)`` and the image geometry, as encoded) and ``summary.json``; so adding a method to ``scores.methods`` computes only that method. The
methods still missing are computed together (one calibration pass per set serves them all).
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..calibration import load_for_calibration
from ..io import atomic_write_json, atomic_write_jsonl
from ..masks import atomic_save_safetensors
from ..models import DTYPES
from ..params import Params
from ..prompts import encode_calibration, token_record
from ..runs import Run, Spec
from ..scores import METHODS, check_method, compute_scores, score_methods
from . import data
from .base import Result, ensure, finished, model_reads, requirements

NAME = "scores"
SETS = ("safety", "utility")


@dataclass
class ScoresResult(Result):
    """The scores of a run: ``dirs`` maps each scored method to its folder; ``dir``/``key`` are
    the pruning method's."""

    method: str = "wanda"
    dirs: dict[str, Path] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        return list(self.dirs)

    def path(self, which: str, method: str | None = None) -> Path:
        """The safetensors file of set ``which`` ('safety' = S, 'utility' = U) for ``method``."""
        if which not in SETS:
            raise ValueError(f"unknown score set {which!r}; sets: {', '.join(SETS)}")
        method = check_method(method or self.method)
        if method not in self.dirs:
            raise FileNotFoundError(f"no {method} scores in this run for these params (scored: "
                                    f"{', '.join(self.dirs)}); add it to scores.methods")
        return self.dirs[method] / f"{which}.safetensors"

    def load(self, which: str, method: str | None = None,
             keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Scores of set ``which`` for ``method`` (default: the pruning method), all modules or ``keys``."""
        from safetensors import safe_open

        with safe_open(str(self.path(which, method)), framework="pt") as f:
            return {k: f.get_tensor(k) for k in (list(f.keys()) if keys is None else keys)}


def spec(params: Params, method: str | None = None) -> Spec:
    """The key of one method's scores (default: the pruning method's)."""
    method = check_method(method or params.pruning.method)
    reads = {"model": model_reads(params), "fidelity": params.fidelity, "method": method,
             "samples": {w: data.sample_fingerprint(params, f"scores_{w}") for w in SETS},
             "batch_size": params.scores.batch_size, "save_dtype": params.scores.save_dtype}
    if method == "sparsegpt":
        reads["percdamp"] = params.pruning.percdamp
    return Spec(NAME, method, reads, needs=(data.spec(params),), params=params, runner=run)


def methods(params: Params) -> list[str]:
    """The methods a run scores: ``pruning.method`` plus ``scores.methods``."""
    return score_methods(params.pruning.method, params.scores.methods)


def load(run: Run) -> ScoresResult:
    """The finished scores of every method the params name."""
    params = run.params
    dirs, summaries = {}, {}
    for m in methods(params):
        dirs[m], summaries[m] = finished(run, spec(params, m), f"scores ({m})")
    main = spec(params)
    method = params.pruning.method
    return ScoresResult(dirs[method], main.key, summaries[method], method, dirs)


def run(run: Run, *, upstream: str = "compute", progress: bool = True) -> ScoresResult:
    """Compute the missing methods' scores (S and U) of ``run``; reuse the others."""
    params = run.params
    ensure(run, requirements(spec(params)), upstream, progress)
    todo = [m for m in methods(params) if not run.is_done(spec(params, m))]
    if not todo:
        return load(run)
    sets = data.load(run)
    lm = load_for_calibration(params)
    with ExitStack() as stack:
        outs = {m: stack.enter_context(run.step(spec(params, m))) for m in todo}
        info: dict[str, dict] = {}
        for which in SETS:
            samples = sets.load(f"scores_{which}")
            t0 = time.perf_counter()
            res = compute_scores(lm, samples, todo, params.fidelity, params.scores.batch_size, params.pruning.percdamp,
                                 params.scores.offload_layers, progress, DTYPES[params.scores.save_dtype], desc=which)
            meta = {"set": which, "fidelity": params.fidelity, "model": params.model.name,
                    "n_samples": str(len(samples))}
            tokens = [token_record(c.id, c.inputs, start=c.start, end=c.end)
                      for c in (encode_calibration(lm.processor, x, params.fidelity, lm.adapter) for x in samples)]
            for m, sc in res.items():
                atomic_save_safetensors(outs[m] / f"{which}.safetensors", sc, {**meta, "method": m})
                atomic_write_jsonl(outs[m] / f"tokens_{which}.jsonl", tokens)
            info[which] = {"n_samples": len(samples), "ids": [x.id for x in samples],
                           "wall_s": round(time.perf_counter() - t0, 3), "methods_computed_together": todo}
        for m in todo:
            atomic_write_json(outs[m] / "summary.json", {
                "method": m, "fidelity": params.fidelity, "model": params.model.name, "dtype": params.scores.save_dtype,
                "percdamp": params.pruning.percdamp if m == "sparsegpt" else None, "sets": info})
    return load(run)


__all__ = ["METHODS", "SETS", "ScoresResult", "spec", "methods", "load", "run"]
