"""Pruning (docs/method.md): patterns, SparseGPT against a plain dense OBS, sequential calibration,
GQA and Mllama models, refused inputs."""

from __future__ import annotations

import pytest
import torch

from hsr_lib.decoder import trace
from hsr_lib.params import ParamsError, load_params
from hsr_lib.prompts import encode_calibration
from hsr_lib.prune import prune_model
from hsr_lib.sparsegpt import damped_cholesky, sparsegpt_prune
from hsr_lib.sparsity import check_sparsity, parse_pattern, pattern_label, prune_mask

from test_scores import brute_snip


def lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Reference mask: per row the k lowest scores, ties to the lower column (explicit loops)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    for r in range(scores.shape[0]):
        order = sorted(range(scores.shape[1]), key=lambda j: (float(scores[r, j]), j))
        for j in order[:k]:
            mask[r, j] = True
    return mask


# ---- patterns --------------------------------------------------------------------------------

@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.6, 0.77])
@pytest.mark.parametrize("cols", [64, 100])
def test_unstructured_zeroes_exactly_int_in_s_per_row(sparsity, cols):
    scores = torch.rand(12, cols, generator=torch.Generator().manual_seed(cols))
    mask = prune_mask(scores, sparsity)
    assert (mask.sum(1) == int(cols * sparsity)).all()
    assert torch.equal(mask, lowest(scores, int(cols * sparsity)))


def test_unstructured_ties_keep_the_stable_order():
    mask = prune_mask(torch.ones(3, 8), 0.5)
    assert mask[:, :4].all() and not mask[:, 4:].any()
    scores = torch.randint(0, 4, (20, 64), generator=torch.Generator().manual_seed(0)).float()  # many ties
    for s in (0.3, 0.5, 0.9):
        assert torch.equal(prune_mask(scores, s), lowest(scores, int(64 * s)))


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_n_m_holds_in_every_block(pattern):
    n, m = parse_pattern(pattern)
    scores = torch.rand(10, 64, generator=torch.Generator().manual_seed(m))
    mask = prune_mask(scores, n / m, pattern)
    blocks = mask.view(10, 64 // m, m)
    assert (blocks.sum(-1) == n).all()
    for b in range(64 // m):
        assert torch.equal(blocks[:, b], lowest(scores[:, b * m:(b + 1) * m], n))


def test_refused_inputs():
    s = torch.rand(4, 8)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        prune_mask(s, 1.0)
    with pytest.raises(ValueError, match="needs sparsity 0.5"):
        prune_mask(s, 0.6, "2:4")
    with pytest.raises(ValueError, match="N:M"):
        check_sparsity(0.5, "4:2")
    with pytest.raises(ValueError, match="divisible by 8"):
        prune_mask(torch.rand(4, 12), 0.5, "4:8")
    with pytest.raises(ValueError, match="unknown pruning/score method 'magnitude'"):
        prune_model(None, [], "magnitude")
    for bad, needle in ((["pruning.sparsity=1.0"], "pruning.sparsity"), (["pruning.method=magnitude"], "pruning.method"),
                        (["pruning.pattern=2:4", "pruning.sparsity=0.6"], "2:4")):
        with pytest.raises(ParamsError, match=needle):
            load_params(overrides=bad)


# ---- SparseGPT against a plain dense OBS -------------------------------------------------------

def plain_obs(W, H, sparsity, pattern, blocksize, percdamp=0.01):
    """Optimal Brain Surgeon column by column with explicit inverses of the remaining Hessian
    H[j:, j:] (float64): no Cholesky, no lazy batches. Masks are chosen as SparseGPT does, by the
    OBS saliency w² / [H[j:, j:]⁻¹]_00 of the current weights: per block of columns (unstructured:
    every entry at or below the int(numel·s)-th smallest of the block, across rows), or per group
    of M when the sweep reaches it. Dead inputs' weights are zeroed first and count as pruned."""
    W, H = W.double().clone(), H.double().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    rows, cols = W.shape
    nm = parse_pattern(pattern)
    d = torch.tensor([float(torch.linalg.inv(H[j:, j:])[0, 0]) for j in range(cols)], dtype=torch.float64)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        if nm is None:
            t = W[:, i1:i2] ** 2 / d[i1:i2]
            mask[:, i1:i2] = t <= t.flatten().sort().values[int(t.numel() * sparsity)]
        for j in range(i1, i2):
            if nm is not None and j % nm[1] == 0:
                mask[:, j:j + nm[1]] = lowest(W[:, j:j + nm[1]] ** 2 / d[j:j + nm[1]], nm[0])
            Hinv = torch.linalg.inv(H[j:, j:])
            for r in range(rows):
                if mask[r, j]:
                    W[r, j:] -= W[r, j] / Hinv[0, 0] * Hinv[0, :]
                    W[r, j] = 0.0
    return W, mask


@pytest.mark.parametrize("pattern,sparsity,blocksize", [("unstructured", 0.5, 16), ("unstructured", 0.3, 128),
                                                        ("unstructured", 0.6, 24), ("2:4", 0.5, 16),
                                                        ("4:8", 0.5, 32)])
def test_sparsegpt_equals_plain_dense_obs(pattern, sparsity, blocksize):
    g = torch.Generator().manual_seed(7)
    W = torch.randn(12, 48, generator=g)
    X = torch.randn(300, 48, generator=g) * torch.linspace(0.2, 3, 48)
    X[:, 5] = 0  # a dead input
    H = 2 / 300 * X.T @ X
    got_W, got_mask, pd = sparsegpt_prune(W, H, sparsity, pattern, blocksize)
    want_W, want_mask = plain_obs(W, H, sparsity, pattern, blocksize)
    assert pd == 0.01
    assert torch.equal(got_mask, want_mask)
    assert torch.allclose(got_W.double(), want_W, atol=1e-4, rtol=1e-4)
    assert (got_W[got_mask] == 0).all() and got_W.dtype == W.dtype
    assert got_mask[:, 5].all()  # the dead input's weights are zeroed and count as pruned
    if pattern == "unstructured":  # one threshold per block across rows: int(numel·s) + 1 entries at or below it
        for i1 in range(0, 48, blocksize):
            block = got_mask[:, i1:i1 + blocksize]
            assert int(block.sum()) == int(block.numel() * sparsity) + 1
        assert len(set(got_mask.sum(1).tolist())) > 1  # so rows end up unequally sparse
    else:
        n, m = parse_pattern(pattern)
        assert (got_mask.view(12, -1, m).sum(-1) == n).all()


def test_sparsegpt_lowers_the_reconstruction_error_of_plain_zeroing():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(16, 64, generator=g)
    X = torch.randn(400, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated inputs
    H = 2 / 400 * X.T @ X
    Wp, mask, _ = sparsegpt_prune(W, H, 0.5)
    zeroed = W.masked_fill(mask, 0)
    assert ((X @ (Wp - W).T) ** 2).sum() < 0.8 * ((X @ (zeroed - W).T) ** 2).sum()


def test_cholesky_failure_raises_damping_and_says_so():
    H = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # indefinite
    with pytest.warns(RuntimeWarning, match="raising the damping"):
        L, pd = damped_cholesky(H, 0.01, "layers.0.x")
    assert pd >= 1.0 and torch.isfinite(L).all()  # 0.01 and 0.1 fail; 1.0 (or 10) succeeds


# ---- sequential calibration ------------------------------------------------------------------

def _manual_wanda(lm, samples, n_layers, sequential):
    """Wanda on the first ``n_layers`` layers by hand: trace, run each layer with pre-hooks that
    sum x² at response positions, prune, and feed the pruned (or dense) outputs on."""
    items = []
    for s in samples:
        c = encode_calibration(lm.processor, s, "paper", lm.adapter)
        tr = trace(lm, c.inputs, keep="first")
        items.append([tr.hidden[0], tr.kwargs, c.start, c.end])
    masks = {}
    for i in range(n_layers):
        layer = lm.layers[i]
        lins = {k: v for k, v in lm.prunable_linears().items() if k.startswith(f"layers.{i}.")}
        sq = {k: torch.zeros(v.weight.shape[1]) for k, v in lins.items()}

        def hook(name):
            def f(module, args):
                sq[name] += (args[0][0, cur[2]:cur[3]].double() ** 2).sum(0).float()
            return f

        hooks = [lin.register_forward_pre_hook(hook(k)) for k, lin in lins.items()]
        dense_out = []
        with torch.no_grad():
            for cur in items:
                dense_out.append(layer(cur[0], **cur[1][i]))
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for k, lin in lins.items():
                score = lin.weight.abs() * (sq[k] / len(samples)).sqrt()[None, :]
                masks[k] = lowest(score, int(lin.weight.shape[1] * 0.5))
                lin.weight[masks[k]] = 0
            for cur, d in zip(items, dense_out):
                cur[0] = layer(cur[0], **cur[1][i]) if sequential else d
    return masks


@pytest.mark.parametrize("sequential", [True, False])
def test_sequential_calibration_feeds_pruned_outputs_forward(sequential, fresh_lm, calib_samples):
    samples = calib_samples["utility"][:2]
    got = prune_model(fresh_lm("qwen2_5_vl"), samples, "wanda", 0.5, sequential=sequential, progress=False).masks
    want = _manual_wanda(fresh_lm("qwen2_5_vl"), samples, 2, sequential)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    other = _manual_wanda(fresh_lm("qwen2_5_vl"), samples, 2, not sequential)
    assert all(torch.equal(got[k], other[k]) for k in want if k.startswith("layers.0."))  # layer 0: same inputs
    assert not all(torch.equal(got[k], other[k]) for k in want if k.startswith("layers.1."))


def test_sequential_snip_takes_gradients_through_the_pruned_layers_below(fresh_lm, calib_samples):
    samples = calib_samples["utility"][:2]
    got = prune_model(fresh_lm("qwen2_vl"), samples, "snip", 0.5, sequential=True, progress=False).masks
    ref = fresh_lm("qwen2_vl")
    for i in (0, 1):  # layer i's scores: full-model backward with layers < i already pruned
        scores = brute_snip(ref, samples)
        with torch.no_grad():
            for k, lin in ref.prunable_linears().items():
                if k.startswith(f"layers.{i}."):
                    assert torch.equal(got[k], prune_mask(scores[k], 0.5)), k
                    lin.weight[got[k]] = 0
    one_shot = prune_model(fresh_lm("qwen2_vl"), samples, "snip", 0.5, sequential=False, progress=False).masks
    dense = brute_snip(fresh_lm("qwen2_vl"), samples)
    assert all(torch.equal(one_shot[k], prune_mask(dense[k], 0.5)) for k in dense)


# ---- whole models: GQA, Mllama, every method and pattern --------------------------------------

@pytest.mark.parametrize("family", ["qwen2_5_vl", "mllama"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "snip"])
def test_every_module_pruned_to_pattern(family, method, fresh_lm, calib_samples):
    lm = fresh_lm(family)
    dense = {k: v.weight.detach().clone() for k, v in lm.prunable_linears().items()}
    pattern = "2:4" if method == "sparsegpt" else "unstructured"
    res = prune_model(lm, calib_samples["utility"][:2], method, 0.5, pattern, blocksize=32, progress=False)
    assert list(res.masks) == list(dense)
    for k, lin in lm.prunable_linears().items():
        W, mask = lin.weight.detach(), res.masks[k]
        assert mask.dtype == torch.bool and (W[mask] == 0).all()
        if pattern == "2:4":
            assert (mask.view(mask.shape[0], -1, 4).sum(-1) == 2).all()
        else:
            assert (mask.sum(1) == W.shape[1] // 2).all()
        if method == "sparsegpt":
            assert torch.equal(res.weights[k], W)
        else:
            assert torch.equal(W[~mask], dense[k][~mask])  # Wanda and SNIP only zero
    if family == "mllama":
        assert "layers.2.cross_attn.k_proj" in res.masks


def test_pattern_labels_for_folder_names():
    assert pattern_label("unstructured") == "unstructured" and pattern_label("2:4") == "2of4"
    with pytest.raises(ValueError, match="'3:2'"):
        pattern_label("3:2")
