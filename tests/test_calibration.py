"""Layer-by-layer calibration on cached decoder inputs (hsr_lib.calibration)."""

from __future__ import annotations

import torch

from hsr_lib.calibration import (build, encode_batch, layer_linears, layer_on_device, load_for_calibration,
                                 reads_vision, response_losses, run_layer)
from hsr_lib.data import Sample
from hsr_lib.decoder import trace
from hsr_lib.params import load_params
from hsr_lib.prompts import encode_calibration


def test_cache_holds_first_layer_inputs_and_response_positions(fresh_lm, calib_samples):
    lm = fresh_lm("qwen2_5_vl")
    s = calib_samples["utility"][0]
    cal = build(lm, [s], progress=False)
    c = encode_calibration(lm.processor, s, "paper", lm.adapter)
    tr = trace(lm, c.inputs, keep="first")
    b = cal.batches[0]
    assert torch.equal(b.hidden, tr.hidden[0])
    assert b.select[0].nonzero().flatten().tolist() == list(range(c.start, c.end))
    assert torch.equal(b.labels, c.labels()) and cal.n_tokens == c.n_response and cal.ids == [s.id]


def test_each_linear_sees_its_own_input(fresh_lm, calib_samples):
    """q/k/v: input-layernormed states; o: attention output; gate/up: post-attention-layernormed;
    down: act(gate) * up — each at response positions only."""
    lm = fresh_lm("qwen2_5_vl")
    cal = build(lm, calib_samples["utility"][:1], progress=False)
    seen: dict[str, torch.Tensor] = {}
    outs = run_layer(lm, cal, lambda name, x: seen.__setitem__(name, x))
    layer, b = lm.layers[0], cal.batches[0]
    h = b.hidden
    normed = layer.input_layernorm(h)
    captured = {}
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("o", a[0])),
             layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("down", a[0])),
             layer.mlp.gate_proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("gate", a[0]))]
    with torch.no_grad():
        out = layer(h, **b.kwargs[0])
    for hk in hooks:
        hk.remove()
    sel = b.select
    for p in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(seen[f"layers.0.self_attn.{p}"], normed[sel])
    assert torch.equal(seen["layers.0.self_attn.o_proj"], captured["o"][sel])
    mid = h + layer.self_attn.o_proj(captured["o"])
    assert torch.allclose(seen["layers.0.mlp.gate_proj"], layer.post_attention_layernorm(mid)[sel], atol=1e-6)
    assert torch.equal(seen["layers.0.mlp.up_proj"], captured["gate"][sel])
    act = layer.mlp.act_fn(layer.mlp.gate_proj(captured["gate"])) * layer.mlp.up_proj(captured["gate"])
    assert torch.allclose(seen["layers.0.mlp.down_proj"], act[sel], atol=1e-6)
    assert torch.equal(outs[0], out[0] if isinstance(out, tuple) else out)
    assert set(seen) == set(layer_linears(lm, 0))


def _square_and_wide_images(tmp_path):
    from PIL import Image

    paths = []
    for name, size in (("square", (32, 32)), ("wide", (64, 28))):
        im = Image.new("RGB", size, (120, 40, 200))
        p = tmp_path / f"{name}.png"
        im.save(p)
        paths.append(str(p))
    return [Sample(f"s{i}", "What is shown here?", "A purple rectangle.", p) for i, p in enumerate(paths)]


def test_mllama_cross_kv_see_every_vision_token_of_the_real_tiles(fresh_lm, tmp_path):
    """Cross-attention k/v read vision tokens: all patches of the tiles the response attends to,
    padding tiles left out; q/o/MLP of the cross layer read text response positions."""
    lm = fresh_lm("mllama")
    cross = lm.geometry.cross_layers[0]
    assert reads_vision(lm, f"layers.{cross}.cross_attn.k_proj") and not reads_vision(lm, f"layers.{cross}.cross_attn.q_proj")
    for s in _square_and_wide_images(tmp_path):
        c = encode_calibration(lm.processor, s, "paper", lm.adapter)
        tiles = int(c.inputs["aspect_ratio_mask"].sum())
        cal = build(lm, [s], progress=False)
        for _ in range(cross):
            cal.advance(run_layer(lm, cal))
        rows: dict[str, int] = {}
        run_layer(lm, cal, lambda name, x: rows.__setitem__(name, x.shape[0]))
        patches = cal.batches[0].kwargs[cross]["cross_attention_states"].shape[1]
        assert rows[f"layers.{cross}.cross_attn.k_proj"] == rows[f"layers.{cross}.cross_attn.v_proj"] == tiles * patches
        assert rows[f"layers.{cross}.cross_attn.q_proj"] == rows[f"layers.{cross}.mlp.down_proj"] == c.n_response
    assert tiles == 2  # the wide image uses both tiles; the square one only its first (checked in the loop)


def test_batch_encoding_shifts_response_spans_by_left_padding(fresh_lm, calib_samples):
    lm = fresh_lm("qwen2_vl")
    samples = calib_samples["utility"][:2]
    inputs, spans = encode_batch(lm, samples)
    for b, s in enumerate(samples):
        c = encode_calibration(lm.processor, s, "paper", lm.adapter)
        pad = inputs["input_ids"].shape[1] - c.input_ids.shape[0]
        assert spans[b] == (c.start + pad, c.end + pad)
        assert inputs["input_ids"][b, spans[b][0]:spans[b][1]].tolist() == c.input_ids[c.start:c.end].tolist()


def test_offload_switch_keeps_results(fresh_lm, calib_samples):
    lm = fresh_lm("qwen2_5_vl")
    cal = build(lm, calib_samples["utility"][:1], progress=False)
    with layer_on_device(lm, 0, offload=False):
        a = run_layer(lm, cal)
    with layer_on_device(lm, 0, offload=True) as layer:
        assert next(layer.parameters()).device == lm.device
        b = run_layer(lm, cal)
    assert next(lm.layers[0].parameters()).device.type == "cpu" and torch.equal(a[0], b[0])
    P = load_params(overrides={"model.name": "tiny:qwen2_vl", "model.device": "cpu", "scores.offload_layers": True})
    assert load_for_calibration(P).device.type == "cpu"  # no accelerator: a plain load


def test_response_losses_equal_hf_loss(fresh_lm, calib_samples):
    lm = fresh_lm("llava_next")
    s = calib_samples["utility"][0]
    c = encode_calibration(lm.processor, s, "paper", lm.adapter)
    with torch.no_grad():
        want = float(lm.model(**c.inputs, labels=c.labels()).loss)
    assert response_losses(lm, [s]) == [want]


def test_linears_reading_one_input_share_its_rows(fresh_lm, calib_samples):
    """q/k/v (and gate/up, and Mllama's cross k/v) get the very same rows object, so statistics
    are computed once per input."""
    from hsr_lib.scores import InputStats

    lm = fresh_lm("mllama")
    cal = build(lm, calib_samples["utility"][:1], progress=False)
    cross = lm.geometry.cross_layers[0]
    for i in (0, cross):
        st = InputStats()
        cal.advance(run_layer(lm, cal, st.add)) if i == 0 else None
        if i == cross:
            for _ in range(1, cross):
                cal.advance(run_layer(lm, cal))
            run_layer(lm, cal, st.add)
        attn = "cross_attn" if i == cross else "self_attn"
        groups = {}
        for name in layer_linears(lm, i):
            groups.setdefault(st.key(name), []).append(name.split(".")[-1])
        shared = ["k_proj", "v_proj"] if i == cross else ["q_proj", "k_proj", "v_proj"]
        assert sorted(map(sorted, groups.values())) == sorted(
            map(sorted, [shared, ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]] + ([["q_proj"]] if i == cross else []))), attn


def test_stats_only_pass_stops_after_the_last_linear(fresh_lm, calib_samples):
    lm = fresh_lm("qwen2_5_vl")
    cal = build(lm, calib_samples["utility"][:2], progress=False)
    full, early = {}, {}
    assert len(run_layer(lm, cal, lambda n, x: full.setdefault(n, []).append(x))) == 2
    calls = []
    hook = lm.layers[0].post_attention_layernorm.register_forward_hook(lambda *a: calls.append(1))
    out = run_layer(lm, cal, lambda n, x: early.setdefault(n, []).append(x), outputs=False)
    hook.remove()
    assert out == [] and len(calls) == 2 and full.keys() == early.keys()
    assert all(torch.equal(a, b) for k in full for a, b in zip(full[k], early[k]))
