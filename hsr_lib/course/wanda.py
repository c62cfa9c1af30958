"""Exercise 2's checks: Wanda importance of one linear from its calibration inputs, then the pruning
mask, unstructured (per row) and N:M.

Expected values come from the library (:class:`hsr_lib.scores.InputStats`,
:func:`hsr_lib.scores.wanda_score`, :func:`hsr_lib.sparsity.prune_mask`). A mask is accepted when it
is *a* correct answer: ties between equal scores may go either way.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..sparsity import prune_mask
from ..scores import InputStats, wanda_score
from .feedback import as_mask, as_tensor, call, fail, first_index, passed


def reference_wanda(W: torch.Tensor, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """|W| · sqrt(r), r_j = (1/N) Σ_n Σ_t x²_{n,t,j}, through the library."""
    stats = InputStats(sq=True)
    for x in inputs:
        stats.add("linear", x)
    return wanda_score(W, stats.mean_sq("linear", len(inputs), W.shape[1]))


def _random_case(seed: int, out_f: int, in_f: int, n: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g)
    xs = [torch.randn(int(torch.randint(2, 7, (1,), generator=g)), in_f, generator=g) * torch.linspace(0.1, 3, in_f)
          for _ in range(n)]
    return W, xs


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-6)


def _wanda_mistake(W: torch.Tensor, xs: Sequence[torch.Tensor], got: torch.Tensor) -> str:
    N, T = len(xs), sum(x.shape[0] for x in xs)
    sq = sum(x.double().pow(2).sum(0) for x in xs)
    absW = W.double().abs()
    tries = [
        (absW * (sq / T).sqrt()[None, :], f"you averaged over all {T} tokens; Wanda sums over a sample's tokens and "
         f"averages over the N = {N} samples: r_j = (1/N) Σ_n Σ_t x²"),
        (absW * sq.sqrt()[None, :], f"you summed over the samples without dividing by N = {N}"),
        (absW * (sq / N)[None, :], "you forgot the square root: score = |W| · sqrt(r)"),
        (W.double() * (sq / N).sqrt()[None, :], "you used W instead of |W|: a large negative weight matters as much "
         "as a large positive one"),
        (absW * (sum(x.double().abs().sum(0) for x in xs) / N).sqrt()[None, :], "you summed |x| instead of x²"),
    ]
    if W.shape[0] == W.shape[1]:
        tries.append((absW * (sq / N).sqrt()[:, None], "you multiplied row j by sqrt(r_j); r_j belongs to input "
                      "column j: broadcast over rows, sqrt(r)[None, :]"))
    for want, why in tries:
        if want.shape == got.shape and _close(got, want):
            return f" Likely mistake: {why}."
    return ""


def check_wanda_importance(your_fn: Callable, W_toy: torch.Tensor | None = None,
                           inputs_toy: Sequence[torch.Tensor] | None = None) -> None:
    """``your_fn(W [out, in], inputs: list of [T_n, in]) -> [out, in]`` Wanda scores, on random
    matrices and (if given) the toy's linear with its calibration inputs."""
    cases = [(*_random_case(0, 6, 8, 3), "a random 6×8 matrix"), (*_random_case(1, 8, 8, 4), "a random 8×8 matrix"),
             (*_random_case(2, 5, 12, 1), "a random 5×12 matrix with one sample")]
    if W_toy is not None:
        cases.append((W_toy, list(inputs_toy), f"the toy's {W_toy.shape[0]}×{W_toy.shape[1]} linear"))
    for W, xs, what in cases:
        want = reference_wanda(W, xs)
        got = as_tensor(call(your_fn, W.clone(), [x.clone() for x in xs], name="wanda_importance"),
                        "wanda_importance", want).detach()
        if not _close(got, want):
            i, j = first_index(~torch.isclose(got.double(), want.double(), rtol=1e-4, atol=1e-6))
            fail(f"wanda_importance on {what}: entry ({i}, {j}) expected {want[i, j].item():.6g}, got "
                 f"{got[i, j].item():.6g}.{_wanda_mistake(W, xs, got)}")
    passed(f"wanda_importance matches the library on {len(cases)} matrices")


def _mask_mistake_common(got: torch.Tensor, want: torch.Tensor, score: torch.Tensor, what: str) -> None:
    if torch.equal(got, ~want):
        fail(f"{what}: your mask is the exact opposite of the expected one. Either it is True where a weight is "
             "kept (the convention here: True = pruned, the weights set to zero), or you pruned the most important "
             "weights (prune the lowest scores).")


def _check_row_mask(got: torch.Tensor, score: torch.Tensor, sparsity: float, what: str) -> None:
    rows, cols = score.shape
    k = int(cols * sparsity)
    want = prune_mask(score, sparsity)
    _mask_mistake_common(got, want, score, what)
    counts = got.sum(1)
    if int(counts.sum()) == rows * k and not bool((counts == k).all()):
        i = int(torch.nonzero(counts != k)[0])
        fail(f"{what}: row {i} has {int(counts[i])} pruned weights, expected {k}; the total is right, so you "
             "probably compared weights across the whole matrix. Wanda compares weights within each output row.")
    if not bool((counts == k).all()):
        i = int(torch.nonzero(counts != k)[0])
        c = int(counts[i])
        why = ""
        if c == round(cols * sparsity) or c == -(-cols * sparsity // 1):
            why = f" You rounded {cols}·{sparsity} = {cols * sparsity:g} up; take int(in · sparsity) = {k} (round down)."
        elif c == cols - k:
            why = (f" You pruned in − int(in · sparsity) = {cols - k} weights: that is the number to keep; prune "
                   "int(in · sparsity) weights per row.")
        fail(f"{what}: row {i} has {c} pruned weights; expected int({cols} · {sparsity}) = {k}.{why}")
    for i in range(rows):
        pr, kept = score[i][got[i]], score[i][~got[i]]
        if len(pr) and len(kept) and pr.max() > kept.min():
            highest = bool(torch.equal(got[i], prune_mask(-score[i:i + 1], sparsity)[0]))
            why = " You pruned the most important weights; prune the lowest scores." if highest else ""
            fail(f"{what}: row {i} prunes a weight with score {pr.max().item():.4g} but keeps one with the lower "
                 f"score {kept.min().item():.4g}.{why}")


def _check_nm_mask(got: torch.Tensor, score: torch.Tensor, n: int, m: int, what: str) -> None:
    rows, cols = score.shape
    want = prune_mask(score, n / m, f"{n}:{m}")
    _mask_mistake_common(got, want, score, what)
    if cols % m == 0 and rows % m == 0 and torch.equal(got, prune_mask(score.T.contiguous(), n / m, f"{n}:{m}").T):
        fail(f"{what}: your blocks run down the columns. An {n}:{m} block is {m} consecutive inputs (columns) of "
             "one row.")
    blocks = got.reshape(rows, cols // m, m)
    counts = blocks.sum(2)
    if not bool((counts == n).all()):
        i, b = first_index(counts != n)
        fail(f"{what}: row {i}, columns {b * m}…{b * m + m - 1} hold {int(counts[i, b])} pruned weights; expected "
             f"{n} in every block of {m} consecutive inputs.")
    sb = score.reshape(rows, cols // m, m)
    for i in range(rows):
        for b in range(cols // m):
            pr, kept = sb[i, b][blocks[i, b]], sb[i, b][~blocks[i, b]]
            if pr.max() > kept.min():
                fail(f"{what}: row {i}, columns {b * m}…{b * m + m - 1}: you prune a weight with score "
                     f"{pr.max().item():.4g} and keep one with score {kept.min().item():.4g}; prune the {n} lowest "
                     "of the block.")


def check_masks(unstructured_fn: Callable, nm_fn: Callable, score_toy: torch.Tensor | None = None) -> None:
    """``unstructured_fn(score, sparsity)`` and ``nm_fn(score, n, m)`` → boolean [out, in] masks
    (True = pruned), checked on random scores (several sparsities, 2:4 and 4:8) and the toy's scores."""
    g = torch.Generator().manual_seed(0)
    cases = [(torch.rand(6, 8, generator=g), 0.5), (torch.rand(5, 12, generator=g), 0.3),
             (torch.rand(4, 10, generator=g), 0.75), (torch.rand(3, 16, generator=g), 0.0)]
    nm_cases = [(torch.rand(8, 8, generator=g), 2, 4), (torch.rand(4, 16, generator=g), 4, 8),
                (torch.rand(6, 12, generator=g), 1, 4)]
    if score_toy is not None:
        cases.append((score_toy, 0.8))
        nm_cases.append((score_toy, 2, 4))
    for score, s in cases:
        what = f"unstructured_mask on a {score.shape[0]}×{score.shape[1]} score at sparsity {s}"
        got = as_mask(call(unstructured_fn, score.clone(), s, name="unstructured_mask"), "unstructured_mask", score)
        _check_row_mask(got, score, s, what)
    for score, n, m in nm_cases:
        what = f"nm_mask({n}:{m}) on a {score.shape[0]}×{score.shape[1]} score"
        got = as_mask(call(nm_fn, score.clone(), n, m, name="nm_mask"), "nm_mask", score)
        _check_nm_mask(got, score, n, m, what)
    passed(f"unstructured_mask right on {len(cases)} score matrices, nm_mask on {len(nm_cases)}")
