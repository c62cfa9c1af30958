"""SparseGPT (Frantar & Alistarh, 2023): OBS pruning with lazy column blocks (docs/method.md).

``H = (2/N) Σ_n X_n X_nᵀ`` over response positions. Dead inputs (``H_jj = 0``) get ``H_jj = 1``;
then ``0.01 · mean(diag H)`` is added to the diagonal. When the Cholesky factorisation still
fails, the damping is multiplied by 10 (a warning says so) until it succeeds.

``U`` is the upper Cholesky factor of ``H⁻¹``; ``U_jj² = [H[j:, j:]⁻¹]_00``. Mask selection is the
original algorithm's (IST-DASLab ``fasterprune``), entry for entry:

- unstructured: when the sweep reaches a block of columns ``[i1, i2)``, ``t = w² / U_jj²`` is formed
  for the whole block (all rows, the block's weights as updated so far) and every entry with
  ``t ≤`` the ``int(numel·s)``-th smallest value (0-based) is pruned: one threshold per block across
  rows, so rows end up unequally sparse;
- N:M: each group of M columns loses, per row, its N lowest ``t`` when the sweep reaches it.

The weights of dead inputs are zeroed before the sweep, as the original does; they count as
pruned in the returned mask. (The importance *score* stored for S and U, docs/method.md, is
``W² / [H⁻¹]_jj`` with the full inverse: :func:`inverse_diagonal`.)
"""

from __future__ import annotations

import warnings

import torch

from .sparsity import Rule, rule


def dead_inputs(H: torch.Tensor) -> torch.Tensor:
    """Inputs that never fired in the calibration data (``H_jj = 0``)."""
    return torch.diagonal(H) == 0


def _prepared(H: torch.Tensor) -> torch.Tensor:
    """fp32 copy of ``H`` with dead inputs' diagonal set to 1."""
    H = H.detach().float().clone()
    diag = torch.diagonal(H)
    diag[diag == 0] = 1.0
    return H


def damped_cholesky(H: torch.Tensor, percdamp: float = 0.01, name: str = "",
                    max_tries: int = 8) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor of ``H`` (dead inputs fixed) + damping, and the damping fraction used."""
    H = _prepared(H)
    mean = torch.diagonal(H).mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    pd = percdamp
    for _ in range(max_tries):
        L, info = torch.linalg.cholesky_ex(H + pd * mean * eye)
        if int(info) == 0 and torch.isfinite(torch.diagonal(L)).all():
            return L, pd
        warnings.warn(f"SparseGPT {name}: Cholesky failed with damping {pd:g}·mean(diag H); "
                      f"raising the damping to {pd * 10:g}", RuntimeWarning, stacklevel=2)
        pd *= 10
    raise RuntimeError(f"SparseGPT {name}: Cholesky failed even with damping {pd / 10:g}·mean(diag H)")


def _inverse_lower(L: torch.Tensor) -> torch.Tensor:
    """``L⁻¹`` of a lower-triangular ``L`` (a triangular solve: much faster on CPUs than cholesky_inverse)."""
    eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
    return torch.linalg.solve_triangular(L, eye, upper=False)


def inverse_diagonal(H: torch.Tensor, percdamp: float = 0.01, name: str = "") -> tuple[torch.Tensor, float]:
    """``diag(H⁻¹)`` of the damped Hessian (fp32) and the damping fraction used."""
    L, pd = damped_cholesky(H, percdamp, name)
    return _inverse_lower(L).pow(2).sum(0), pd  # H⁻¹ = L⁻ᵀ L⁻¹


def inverse_cholesky(H: torch.Tensor, percdamp: float = 0.01, name: str = "") -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of the damped ``H⁻¹`` (``H⁻¹ = UᵀU``) and the damping fraction used.

    With J the reversal permutation, ``J H J = M Mᵀ`` (M lower) gives ``H = R Rᵀ`` with ``R = J M J``
    upper triangular, so ``U = R⁻¹``: one factorisation and one triangular solve, no inverse formed."""
    M, pd = damped_cholesky(torch.flip(H, (0, 1)), percdamp, name)
    R = torch.flip(M, (0, 1))
    eye = torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
    return torch.linalg.solve_triangular(R, eye, upper=True), pd


@torch.no_grad()
def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor | None, sparsity: float | Rule, pattern: str = "unstructured",
                    blocksize: int = 128, percdamp: float = 0.01, name: str = "",
                    hinv: tuple[torch.Tensor, float] | None = None,
                    dead: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Prune ``W`` [out, in] with the OBS updates of SparseGPT given ``H`` [in, in] (or ``hinv``,
    :func:`inverse_cholesky` of it, and ``dead``, :func:`dead_inputs` of it, shared by linears that
    read the same input).

    Returns the new weights (``W``'s dtype; pruned entries exactly zero, survivors updated),
    the mask (True = pruned, dead inputs included) and the damping fraction actually used.
    ``sparsity`` may be a :class:`~hsr_lib.sparsity.Rule` its caller already checked."""
    mask_rule = rule(sparsity, pattern)
    sparsity, nm = mask_rule.sparsity, mask_rule.nm
    rows, cols = W.shape
    if nm is not None and (cols % nm[1] or blocksize % nm[1]):
        raise ValueError(f"{name}: pattern {mask_rule.pattern!r} needs in_features ({cols}) and blocksize "
                         f"({blocksize}) "
                         f"divisible by {nm[1]}")
    if hinv is None:
        hinv = inverse_cholesky(H, percdamp, name)
        dead = dead_inputs(H)
    Hinv, pd = hinv
    Hinv = Hinv.to(W.device)
    dtype = W.dtype
    WT = W.detach().float().t().contiguous()  # [in, out]: column j of W is the contiguous row j here
    maskT = torch.zeros(cols, rows, dtype=torch.bool, device=W.device)
    if dead is not None:
        dead = dead.to(W.device)
        WT[dead] = 0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = WT[i1:i2].clone()
        Q1 = torch.empty_like(W1)
        Err1 = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diagonal(Hinv1)[:, None]
        if nm is None:
            tmp = W1 ** 2 / d1 ** 2
            thresh = torch.kthvalue(tmp.flatten(), int(tmp.numel() * sparsity) + 1).values
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                tmp = W1[i:i + nm[1]] ** 2 / d1[i:i + nm[1]] ** 2
                mask1.scatter_(0, i + torch.argsort(tmp, dim=0, stable=True)[:nm[0]], True)
            w, m = W1[i], mask1[i]
            Q1[i] = w.masked_fill(m, 0)
            err = w.masked_fill(~m, 0) / Hinv1[i, i]
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)
            Err1[i] = err
        WT[i1:i2] = Q1
        WT[i2:] -= Hinv[i1:i2, i2:].T @ Err1
        maskT[i1:i2] = mask1
    if dead is not None:
        maskT[dead] = True
    W, mask = WT.t().contiguous(), maskT.t().contiguous()
    return W.to(dtype), mask, pd
