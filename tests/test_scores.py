"""Importance scores (docs/method.md): each equals a brute-force computation with explicit loops over
samples and tokens on a full-model forward, for MHA, GQA and Mllama tiny models."""

from __future__ import annotations

import pytest
import torch

from hsr_lib.prompts import encode_calibration
from hsr_lib.scores import InputStats, check_method, compute_scores, score_methods, sparsegpt_score, wanda_score
from hsr_lib.views import describe_scores, overlap_table

FAMILIES = ["llava_next", "qwen2_5_vl", "mllama"]  # MHA, GQA (M-RoPE), GQA + cross-attention


def is_vision_input(lm, name: str) -> bool:
    i, module = int(name.split(".")[1]), name.split(".")[-1]
    return i in lm.geometry.cross_layers and module in ("k_proj", "v_proj")


def brute_rows(lm, sample) -> tuple[dict[str, list[torch.Tensor]], object]:
    """Inputs of every prunable linear in one full forward, selected with explicit loops: text
    response positions [start, end), or for Mllama's cross k/v every patch of every tile that some
    response position attends to (raw cross_attention_mask == 1)."""
    cal = encode_calibration(lm.processor, sample, "paper", lm.adapter)
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args):
            seen.setdefault(name, args[0].detach().double())  # returns None: the input is unchanged
        return hook

    hooks = [lin.register_forward_pre_hook(keep(name)) for name, lin in lm.prunable_linears().items()]
    try:
        with torch.no_grad():
            lm.model(**cal.inputs, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    rows: dict[str, list[torch.Tensor]] = {}
    for name, x in seen.items():
        vec = []
        if is_vision_input(lm, name):
            cam = cal.inputs["cross_attention_mask"][0]  # [T, images, tiles]
            n_img, n_tiles = cam.shape[1], cam.shape[2]
            for img in range(n_img):
                for tile in range(n_tiles):
                    if any(int(cam[t, img, tile]) == 1 for t in range(cal.start, cal.end)):
                        for p in range(x.shape[1]):
                            vec.append(x[img * n_tiles + tile, p])
        else:
            for t in range(cal.start, cal.end):
                vec.append(x[0, t])
        rows[name] = vec
    return rows, cal


def brute_wanda_sparsegpt(lm, samples, percdamp=0.01):
    """Wanda and SparseGPT scores by explicit loops (float64)."""
    n = len(samples)
    sq: dict[str, torch.Tensor] = {}
    H: dict[str, torch.Tensor] = {}
    for s in samples:
        rows, _ = brute_rows(lm, s)
        for name, vec in rows.items():
            d = lm.prunable_linears()[name].weight.shape[1]
            sq.setdefault(name, torch.zeros(d, dtype=torch.float64))
            H.setdefault(name, torch.zeros(d, d, dtype=torch.float64))
            for x in vec:
                sq[name] += x * x
                H[name] += torch.outer(x, x)
    wanda, sgpt = {}, {}
    for name, lin in lm.prunable_linears().items():
        W = lin.weight.detach().double()
        wanda[name] = W.abs() * (sq[name] / n).sqrt()[None, :]
        h = H[name] * 2 / n
        dead = torch.diagonal(h) == 0
        h[dead, dead] = 1
        h += percdamp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
        sgpt[name] = W.masked_fill(dead[None, :], 0) ** 2 / torch.diagonal(torch.linalg.inv(h))[None, :]
    return wanda, sgpt


def brute_snip(lm, samples):
    """|W| · Σ_n |∂L_n/∂W| with one full-model backward per sample (HF's loss on cal.labels())."""
    lins = lm.prunable_linears()
    acc = {k: torch.zeros_like(v.weight, dtype=torch.float64) for k, v in lins.items()}
    for s in samples:
        cal = encode_calibration(lm.processor, s, "paper", lm.adapter)
        lm.model.zero_grad()
        loss = lm.model(**cal.inputs, labels=cal.labels(), use_cache=False).loss
        loss.backward()
        for k, v in lins.items():
            acc[k] += v.weight.grad.double().abs()
    lm.model.zero_grad()
    return {k: v.weight.detach().double().abs() * acc[k] for k, v in lins.items()}


def assert_close(got: dict, want: dict, rtol: float) -> None:
    assert set(got) == set(want)
    for k in want:
        g, w = got[k].double(), want[k]
        assert g.shape == w.shape, k
        err = ((g - w).abs() / (w.abs() + rtol * w.abs().max())).max()
        assert err < rtol, f"{k}: relative error {float(err):.2e}"


@pytest.mark.parametrize("family", FAMILIES)
def test_wanda_and_sparsegpt_equal_brute_force(family, fresh_lm, calib_samples):
    lm = fresh_lm(family)
    samples = calib_samples["utility"]
    got = compute_scores(lm, samples, ["wanda", "sparsegpt"], progress=False)
    wanda, sgpt = brute_wanda_sparsegpt(lm, samples)
    assert_close(got["wanda"], wanda, 1e-4)
    assert_close(got["sparsegpt"], sgpt, 2e-3)
    assert all(v.dtype == torch.float32 for v in got["wanda"].values())


@pytest.mark.parametrize("family", FAMILIES)
def test_snip_equals_full_model_backward(family, fresh_lm, calib_samples):
    lm = fresh_lm(family)
    samples = calib_samples["safety"][:2]
    got = compute_scores(lm, samples, ["snip"], progress=False)["snip"]
    assert_close(got, brute_snip(lm, samples), 1e-3)


def test_keys_cover_every_prunable_linear_including_cross_attention(fresh_lm, calib_samples):
    lm = fresh_lm("mllama")
    got = compute_scores(lm, calib_samples["utility"][:1], ["wanda"], progress=False)["wanda"]
    assert list(got) == lm.adapter.prunable_names(lm.model.config)
    assert "layers.2.cross_attn.k_proj" in got and "layers.3.self_attn.q_proj" in got


def test_batched_calibration_equals_one_at_a_time(fresh_lm, calib_samples):
    lm = fresh_lm("qwen2_5_vl")
    samples = calib_samples["utility"]
    one = compute_scores(lm, samples, ["wanda"], batch_size=1, progress=False)["wanda"]
    two = compute_scores(lm, samples, ["wanda"], batch_size=2, progress=False)["wanda"]
    assert_close(two, {k: v.double() for k, v in one.items()}, 1e-4)


def test_input_stats_share_one_computation_for_the_same_tensor():
    st = InputStats(sq=True, xtx=True)
    x, y, z = torch.randn(5, 3), torch.randn(4, 3), torch.randn(2, 6)
    for a, b, c in ((x, x, z), (y, y, z + 1)):  # two batches: "q" and "k" share an input, "o" does not
        st.add("q", a)
        st.add("k", b)
        st.add("o", c)
    assert st.key("k") == st.key("q") == "q" and st.key("o") == "o" and set(st.sq) == {"q", "o"}
    assert torch.allclose(st.mean_sq("k", 2, 3), ((x ** 2).sum(0) + (y ** 2).sum(0)) / 2)
    assert torch.allclose(st.hessian("k", 2, 3), (x.T @ x + y.T @ y))
    assert torch.allclose(st.mean_sq("o", 2, 6), ((z ** 2).sum(0) + ((z + 1) ** 2).sum(0)) / 2)
    assert st.rows == {"q": 9, "k": 9, "o": 4} and torch.equal(st.mean_sq("v", 2, 3), torch.zeros(3))


def test_score_formulas_on_a_single_linear():
    W = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    assert torch.allclose(wanda_score(W, torch.tensor([4.0, 9.0])), torch.tensor([[2.0, 6.0], [6.0, 1.5]]))
    H = torch.tensor([[2.0, 0.0], [0.0, 0.0]])  # input 1 is dead: H_11 -> 1, its weights -> 0; damping 0.01 · mean(2, 1)
    d = 0.015
    want = torch.tensor([[1.0, 0.0], [9.0, 0.0]]) / torch.tensor([1 / (2 + d), 1 / (1 + d)])
    assert torch.allclose(sparsegpt_score(W, H), want)


def test_unknown_method_is_refused(fresh_lm, calib_samples):
    with pytest.raises(ValueError, match="magnitude"):
        check_method("magnitude")
    with pytest.raises(ValueError, match="unknown pruning/score method 'obs'"):
        compute_scores(fresh_lm("qwen2_5_vl"), calib_samples["utility"][:1], ["obs"], progress=False)


def test_overlap_and_description_tables():
    x = torch.tensor([[1.0, 5.0, 3.0], [2.0, 5.0, 0.0]])
    S, U = {"layers.0.mlp.up_proj": x}, {"layers.0.mlp.up_proj": -x}
    row = overlap_table(S, U, 0.5, 0.5).iloc[0]
    assert row.top_q_safety == 3 and row.also_top_p_utility == 0 and row.layer == 0 and row.kind == "up_proj"
    assert overlap_table(S, S, 0.5, 0.5).overlap.iloc[0] == 1.0
    table = describe_scores(S)
    assert table.iloc[0]["max"] == 5.0 and table.iloc[0]["zeros"] == 1 and table.iloc[0]["shape"] == "2×3"


def test_score_methods_keep_the_canonical_order_and_name_a_bad_one():
    assert score_methods("snip", ["wanda", "snip"]) == ["wanda", "snip"]
    with pytest.raises(ValueError, match="'obs'"):
        score_methods("wanda", ["obs"])
