"""Importance scores of every prunable linear on the dense model (docs/method.md; notebook 03).

For W ∈ R^{out×in} with inputs x at the response positions of N calibration samples:

* Wanda: ``r_j = (1/N) Σ_n Σ_t x²_{n,t,j}`` (fp32), score ``|W| · sqrt(r)`` broadcast over rows;
* SparseGPT: ``H = (2/N) Σ_n X_n X_nᵀ``, dead inputs ``H_jj = 1``, damping ``0.01 · mean(diag H)``,
  score ``W_ij² / [H⁻¹]_jj`` (dead inputs' weights zeroed);
* SNIP: ``|W| · Σ_n |∂L_n/∂W|``, ``L_n`` the mean cross-entropy over sample n's response
  positions (:mod:`hsr_lib.snip`).

Pure: a model and samples in, one fp32 tensor per prunable linear (``layers.{i}.{module}``) out.
The step that stores them for a run is :mod:`hsr_lib.steps.scores`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .calibration import build, layer_linears, layer_on_device, run_layer
from .data import Sample
from .models import LoadedModel
from .progress import maybe
from .snip import abs_gradients
from .sparsegpt import dead_inputs, inverse_diagonal

METHODS = ("wanda", "sparsegpt", "snip")


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
                    inv_diag: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The OBS saliency ``W_ij² / [H⁻¹]_jj`` with the damped Hessian (fp32); the weights of dead inputs
    are zeroed, as SparseGPT zeroes them. ``inv_diag`` = (diag(H⁻¹), dead inputs) if known."""
    if inv_diag is None:
        H = H.to(W.device)
        inv_diag = inverse_diagonal(H, percdamp, name)[0], dead_inputs(H)
    d, dead = (t.to(W.device) for t in inv_diag)
    return W.detach().float().masked_fill(dead[None, :], 0) ** 2 / d[None, :]


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
        for i in maybe(range(n_layers), progress, desc=f"{'/'.join(stats_methods)} layers{tag}"):
            with layer_on_device(lm, i, offload):
                stats = InputStats(sq="wanda" in methods, xtx="sparsegpt" in methods)
                more = i < n_layers - 1  # the last layer's outputs feed nothing
                outs = run_layer(lm, cal, stats.add, outputs=more)
                inv_diag: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # per input group: diag(H⁻¹), dead
                for name, lin in layer_linears(lm, i).items():
                    W, width = lin.weight, lin.weight.shape[1]
                    if "wanda" in methods:
                        r = stats.mean_sq(name, cal.n_samples, width)
                        out["wanda"][name] = wanda_score(W, r).to("cpu", out_dtype)
                    if "sparsegpt" in methods:
                        key = stats.key(name)
                        if key not in inv_diag:
                            H = stats.hessian(name, cal.n_samples, width).to(W.device)
                            inv_diag[key] = inverse_diagonal(H, percdamp, name)[0], dead_inputs(H)
                        out["sparsegpt"][name] = sparsegpt_score(W, None, inv_diag=inv_diag[key]).to("cpu", out_dtype)
            if more:
                cal.advance(outs)
    return out


def score_methods(pruning_method: str, extra: Sequence[str] = ()) -> list[str]:
    """The methods a run scores: the pruning method plus ``extra``, in :data:`METHODS` order."""
    wanted = {check_method(pruning_method), *(check_method(m) for m in extra)}
    return [m for m in METHODS if m in wanted]
