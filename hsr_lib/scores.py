"""Importance scores of every prunable linear on the dense model (DESIGN §7; notebook 03).

For W ∈ R^{out×in} with inputs x at the response positions of N calibration samples:

* Wanda: ``r_j = (1/N) Σ_n Σ_t x²_{n,t,j}`` (fp32), score ``|W| · sqrt(r)`` broadcast over rows;
* SparseGPT: ``H = (2/N) Σ_n X_n X_nᵀ``, dead inputs ``H_jj = 1``, damping ``0.01 · mean(diag H)``,
  score ``W_ij² / [H⁻¹]_jj²``;
* SNIP: ``|W| · Σ_n |∂L_n/∂W|``, ``L_n`` the mean cross-entropy over sample n's response
  positions (:mod:`hsr_lib.snip`).

Scores are computed on the safety set (S) and the utility set (U) and stored in
``<run>/scores/<method>_<safety|utility>.safetensors``, one tensor per module keyed
``layers.{i}.{module}``; :func:`load_scores` reads them back (lazily, a subset of keys if asked).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch

from .calibration import _progress, build, layer_linears, layer_on_device, load_for_calibration, run_layer
from .data import Sample
from .io import atomic_write_json, read_json
from .masks import atomic_save_safetensors
from .models import DTYPES, LoadedModel
from .runs import Run
from .snip import abs_gradients
from .sparsegpt import inverse_diagonal

METHODS = ("wanda", "sparsegpt", "snip")
SETS = ("safety", "utility")


def check_method(method: str) -> str:
    """``method`` if it is one of :data:`METHODS`, else ValueError naming it."""
    if method not in METHODS:
        raise ValueError(f"unknown pruning/score method {method!r}; methods: {', '.join(METHODS)}")
    return method


class InputStats:
    """Sums over the selected input rows of each linear: ``Σ x²`` (Wanda) and/or ``Σ x xᵀ`` (SparseGPT), fp32.

    Linears that receive the same input tensor (q/k/v, gate/up, Mllama's cross k/v) form one
    group: its sums are computed and stored once, under the group's first linear."""

    def __init__(self, sq: bool = True, xtx: bool = False):
        self.want_sq, self.want_xtx = sq, xtx
        self.sq: dict[str, torch.Tensor] = {}  # group -> Σ x²
        self.xtx: dict[str, torch.Tensor] = {}  # group -> Σ x xᵀ
        self.group: dict[str, str] = {}  # linear -> group
        self.rows: dict[str, int] = {}  # linear -> rows seen
        self._last: tuple[torch.Tensor | None, str] = (None, "")

    def add(self, name: str, x: torch.Tensor) -> None:
        """Add the rows ``x`` [n, in] that linear ``name`` received."""
        self.rows[name] = self.rows.get(name, 0) + x.shape[0]
        last, key = self._last
        if x is last:  # the same tensor as the previous linear's: a shared input, already summed
            self.group.setdefault(name, key)
            return
        key = self.group.setdefault(name, name)
        self._last = (x, key)
        xf = x.float()
        if self.want_sq:
            sq = xf.pow(2).sum(0)
            self.sq[key] = self.sq[key] + sq if key in self.sq else sq
        if self.want_xtx:
            if key in self.xtx:
                self.xtx[key].addmm_(xf.T, xf)
            else:
                self.xtx[key] = xf.T @ xf

    def key(self, name: str) -> str:
        """The group of linear ``name`` (the linears sharing its input have the same)."""
        return self.group.get(name, name)

    def mean_sq(self, name: str, n_samples: int, width: int) -> torch.Tensor:
        """Wanda's ``r`` = Σ x² / N (zeros when the linear saw nothing)."""
        s = self.sq.get(self.key(name))
        return torch.zeros(width) if s is None else s / n_samples

    def hessian(self, name: str, n_samples: int, width: int) -> torch.Tensor:
        """SparseGPT's ``H = (2/N) Σ X Xᵀ`` (zeros when the linear saw nothing)."""
        s = self.xtx.get(self.key(name))
        return torch.zeros(width, width) if s is None else s * (2.0 / n_samples)


def wanda_score(W: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``|W| · sqrt(r)`` broadcast over rows (fp32)."""
    return W.detach().float().abs() * r.to(W.device).float().sqrt()[None, :]


def sparsegpt_score(W: torch.Tensor, H: torch.Tensor | None, percdamp: float = 0.01, name: str = "",
                    inv_diag: torch.Tensor | None = None) -> torch.Tensor:
    """``W_ij² / [H⁻¹]_jj²`` with the damped Hessian (fp32); ``inv_diag`` = diag(H⁻¹) if known."""
    d = inv_diag if inv_diag is not None else inverse_diagonal(H.to(W.device), percdamp, name)[0]
    return W.detach().float() ** 2 / d.to(W.device)[None, :] ** 2


def snip_score(W: torch.Tensor, abs_grad_sum: torch.Tensor) -> torch.Tensor:
    """``|W| · Σ_n |∂L_n/∂W|`` (fp32)."""
    return W.detach().float().abs() * abs_grad_sum.to(W.device).float()


def compute_scores(lm: LoadedModel, samples: Sequence[Sample], methods: Sequence[str], fidelity: str = "paper",
                   batch_size: int = 1, percdamp: float = 0.01, offload: bool = False, progress: bool = True,
                   out_dtype: torch.dtype = torch.float32, desc: str = "") -> dict[str, dict[str, torch.Tensor]]:
    """Scores of ``methods`` for every prunable linear of the (dense) model, on the CPU."""
    methods = [check_method(m) for m in methods]
    out: dict[str, dict[str, torch.Tensor]] = {m: {} for m in methods}
    n_layers = len(lm.layers)
    tag = f" ({desc})" if desc else ""
    if "snip" in methods:
        cal = build(lm, samples, fidelity, 1, progress, desc=f"cache{tag}")
        grads = abs_gradients(lm, cal, offload=offload, progress=progress)
        for name, lin in lm.prunable_linears().items():
            out["snip"][name] = snip_score(lin.weight, grads.pop(name)).to("cpu", out_dtype)
    stats_methods = [m for m in methods if m != "snip"]
    if stats_methods:
        cal = build(lm, samples, fidelity, batch_size, progress, desc=f"cache{tag}")
        for i in _progress(range(n_layers), progress, desc=f"{'/'.join(stats_methods)} layers{tag}"):
            with layer_on_device(lm, i, offload):
                stats = InputStats(sq="wanda" in methods, xtx="sparsegpt" in methods)
                more = i < n_layers - 1  # the last layer's outputs feed nothing
                outs = run_layer(lm, cal, stats.add, outputs=more)
                inv_diag: dict[str, torch.Tensor] = {}  # per input group: diag(H⁻¹)
                for name, lin in layer_linears(lm, i).items():
                    W, width = lin.weight, lin.weight.shape[1]
                    if "wanda" in methods:
                        r = stats.mean_sq(name, cal.n_samples, width)
                        out["wanda"][name] = wanda_score(W, r).to("cpu", out_dtype)
                    if "sparsegpt" in methods:
                        key = stats.key(name)
                        if key not in inv_diag:
                            H = stats.hessian(name, cal.n_samples, width).to(W.device)
                            inv_diag[key] = inverse_diagonal(H, percdamp, name)[0]
                        out["sparsegpt"][name] = sparsegpt_score(W, None, inv_diag=inv_diag[key]).to("cpu", out_dtype)
            if more:
                cal.advance(outs)
    return out


def score_methods(P) -> list[str]:
    """The methods a run scores: ``pruning.method`` plus ``scores.methods``, in :data:`METHODS` order."""
    wanted = {P.pruning.method, *P.scores.methods}
    return [m for m in METHODS if m in wanted]


def scores_path(run: Run, which: str, method: str) -> Path:
    """``<run>/scores/<method>_<which>.safetensors``."""
    if which not in SETS:
        raise ValueError(f"unknown score set {which!r}; sets: {', '.join(SETS)}")
    return run.step_dir("scores") / f"{check_method(method)}_{which}.safetensors"


def score_step(run: Run, lm: LoadedModel | None = None, progress: bool = True) -> dict:
    """The scores step: S and U for every method of :func:`score_methods`; returns its summary.

    Reuses the artifacts when the step is done with the same params and data; ``lm`` (the dense
    model) is loaded when needed and not given."""
    from .datastep import prepare_data

    P = run.params
    methods = score_methods(P)
    inputs = {"methods": methods}
    sets = prepare_data(run)
    if run.is_done("scores", inputs):
        return read_json(run.step_dir("scores") / "summary.json")
    lm = lm or load_for_calibration(P)
    with run.step("scores", inputs) as d:
        summary: dict = {"methods": methods, "fidelity": P.fidelity, "model": P.model.name,
                         "dtype": P.scores.save_dtype, "percdamp": P.pruning.percdamp, "sets": {}, "files": {}}
        for which in SETS:
            samples = sets.load(f"scores_{which}")
            t0 = time.perf_counter()
            res = compute_scores(lm, samples, methods, P.fidelity, P.scores.batch_size, P.pruning.percdamp,
                                 P.scores.offload_layers, progress, DTYPES[P.scores.save_dtype], desc=which)
            meta = {"set": which, "fidelity": P.fidelity, "model": P.model.name, "n_samples": str(len(samples))}
            for m, sc in res.items():
                path = scores_path(run, which, m)
                atomic_save_safetensors(path, sc, {**meta, "method": m})
                summary["files"][f"{m}_{which}"] = path.name
            summary["sets"][which] = {"n_samples": len(samples), "ids": [s.id for s in samples],
                                      "wall_s": round(time.perf_counter() - t0, 3)}
        atomic_write_json(d / "summary.json", summary)
    return summary


def load_scores(run: Run, which: str, method: str | None = None,
                keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Scores of set ``which`` ('safety' = S, 'utility' = U) for ``method`` (default: the pruning
    method), every module or only ``keys``."""
    from safetensors import safe_open

    path = scores_path(run, which, method or run.params.pruning.method)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no scores; run the scores step (notebook 03) with this method first")
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in (list(f.keys()) if keys is None else keys)}


def overlap_table(S: dict[str, torch.Tensor], U: dict[str, torch.Tensor], q: float, p: float):
    """Per module: the share of T(S, q), the top-q safety weights, that are also in T(U, p), the
    top-p utility weights (DESIGN §9's T; ``p`` is what independent rankings would give)."""
    import pandas as pd

    from .realign import top_fraction

    rows = []
    for name, s in S.items():
        ts, tu = top_fraction(s, q), top_fraction(U[name], p)
        both = int((ts & tu).sum())
        parts = name.split(".")
        rows.append({"module": name, "layer": int(parts[1]), "kind": parts[-1], "top_q_safety": int(ts.sum()),
                     "also_top_p_utility": both, "overlap": both / max(int(ts.sum()), 1), "chance": p})
    return pd.DataFrame(rows)


def describe_scores(scores: dict[str, torch.Tensor]):
    """Per module: shape and quantiles of the scores (a table for notebook 03)."""
    import pandas as pd

    rows = []
    for name, s in scores.items():
        flat = s.flatten().float()
        sample = flat[torch.linspace(0, flat.numel() - 1, min(flat.numel(), 100_000)).long()] if flat.numel() else flat
        qs = torch.quantile(sample, torch.tensor([0.1, 0.5, 0.9])).tolist()
        rows.append({"module": name, "layer": int(name.split(".")[1]), "kind": name.split(".")[-1],
                     "shape": "×".join(map(str, s.shape)), "mean": float(flat.mean()), "p10": qs[0], "median": qs[1],
                     "p90": qs[2], "max": float(flat.max()), "zeros": int((flat == 0).sum())})
    return pd.DataFrame(rows)
