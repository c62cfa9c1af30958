"""Tests for hsr_lib.tiny, hsr_lib.adapters and hsr_lib.models (docs/method.md)."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn

from hsr_lib.adapters import ADAPTERS, MLP_PARTS, ATTN_PARTS, Geometry, adapter_for, chat_style
from hsr_lib.models import (
    LoadedModel,
    ModelError,
    load_model,
    load_processor_only,
    resolve_device,
    resolve_dtype,
)
from hsr_lib.prompts import encode, prompt_text
from hsr_lib.tiny import TINY_MODELS, build_tiny

NAMES = list(TINY_MODELS)

# name -> (family, chat style, n_layers, n_heads, n_kv_heads, head_dim, group_size, is_gqa, cross_layers)
EXPECTED = {
    "llava_next": ("llava_next", "vicuna", 4, 4, 4, 16, 1, False, ()),
    "llava_next_vicuna": ("llava_next", "vicuna", 4, 4, 4, 16, 1, False, ()),
    "llava_next_mistral": ("llava_next", "mistral", 4, 4, 2, 16, 2, True, ()),
    "llava_next_llama3": ("llava_next", "llama3", 4, 4, 2, 16, 2, True, ()),
    "qwen2_vl": ("qwen2_vl", "qwen", 4, 4, 2, 16, 2, True, ()),
    "qwen2_5_vl": ("qwen2_5_vl", "qwen", 4, 4, 2, 16, 2, True, ()),
    "mllama": ("mllama", "llama3", 5, 4, 2, 16, 2, True, (2,)),
}

QUESTION = "What is in this picture?"


def test_expected_table_covers_every_tiny_model():
    assert set(EXPECTED) == set(TINY_MODELS)


def _logits(model, processor, image, question: str = QUESTION) -> torch.Tensor:
    adapter = adapter_for(model.config)
    inputs = encode(processor, [prompt_text(processor, question, adapter)], [image])
    with torch.no_grad():
        return model(**inputs).logits


# --------------------------------------------------------------------------- build + forward


def test_every_tiny_builds_fast():
    build_tiny("llava_next")  # warm-up: imports and lazy module loading
    for name in NAMES:
        t0 = time.perf_counter()
        model, processor = build_tiny(name)
        dt = time.perf_counter() - t0
        assert dt < 1.0, f"tiny:{name} took {dt:.2f} s to build"
        assert isinstance(model, nn.Module) and not model.training


def test_build_tiny_unknown_name():
    with pytest.raises(ValueError, match="tiny:qwen2_vl"):
        build_tiny("nope")


@pytest.mark.parametrize("name", NAMES)
def test_logits_finite_and_depend_on_image(tiny, two_images, name):
    model, processor = tiny(name)
    a, b = two_images
    la, lb = _logits(model, processor, a), _logits(model, processor, b)
    assert la.shape == lb.shape
    assert la.shape[0] == 1 and la.shape[-1] == model.config.get_text_config().vocab_size
    assert torch.isfinite(la).all() and torch.isfinite(lb).all()
    assert not torch.equal(la, lb), f"tiny:{name}: the image does not change the logits"
    assert (la - lb).abs().max() > 1e-3
    # and the same image twice gives the same logits
    assert torch.equal(la, _logits(model, processor, a))


def test_mllama_cross_attention_gates_open(tiny):
    model, _ = tiny("mllama")
    gates = {n: p for n, p in model.named_parameters() if n.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate"))}
    assert len(gates) == 2  # one cross-attention layer: an attention gate and an MLP gate
    assert all(torch.all(p != 0) for p in gates.values())


def test_build_is_deterministic():
    for name in ("llava_next_llama3", "qwen2_5_vl", "mllama"):
        m1, _ = build_tiny(name)
        m2, _ = build_tiny(name)
        s1, s2 = m1.state_dict(), m2.state_dict()
        assert s1.keys() == s2.keys()
        for k in s1:
            assert torch.equal(s1[k], s2[k]), f"tiny:{name}: {k} differs between two builds"
    # a different seed gives different weights
    m3, _ = build_tiny("qwen2_5_vl", seed=1)
    m4, _ = build_tiny("qwen2_5_vl", seed=0)
    assert any(not torch.equal(a, b) for a, b in zip(m3.state_dict().values(), m4.state_dict().values()))


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("name", NAMES)
def test_adapter_geometry(tiny, name):
    model, _ = tiny(name)
    family, _, n_layers, heads, kv, head_dim, group, gqa, cross = EXPECTED[name]
    adapter = adapter_for(model.config)
    assert adapter.family == family
    assert adapter is ADAPTERS[family]
    g = adapter.geometry(model.config)
    assert (g.n_layers, g.n_heads, g.n_kv_heads, g.head_dim, g.group_size, g.is_gqa, g.cross_layers) == (
        n_layers, heads, kv, head_dim, group, gqa, cross)
    assert g.hidden_size == 64
    assert g.n_heads_total == n_layers * heads
    assert len(adapter.decoder_layers(model)) == n_layers
    for i in range(n_layers):
        want = "cross_attn" if i in cross else "self_attn"
        assert adapter.attention_name(model.config, i) == want
        assert adapter.attention(model, i) is getattr(adapter.decoder_layers(model)[i], want)


def _heads_8_kv_2(config, drop_head_dim: bool):
    cfg = copy.deepcopy(config)
    tc = cfg.get_text_config()
    tc.num_attention_heads = 8
    tc.num_key_value_heads = 2
    tc.hidden_size = 64
    if drop_head_dim:
        if "head_dim" in tc.__dict__:
            del tc.__dict__["head_dim"]
    else:
        tc.head_dim = 8
    return cfg


@pytest.mark.parametrize("name", ["llava_next", "qwen2_vl", "mllama"])
@pytest.mark.parametrize("drop_head_dim", [True, False], ids=["derived_head_dim", "explicit_head_dim"])
def test_geometry_read_from_config(tiny, name, drop_head_dim):
    model, _ = tiny(name)
    cfg = _heads_8_kv_2(model.config, drop_head_dim)
    g = adapter_for(cfg).geometry(cfg)
    assert isinstance(g, Geometry)
    assert (g.n_heads, g.n_kv_heads, g.head_dim, g.hidden_size) == (8, 2, 8, 64)
    assert g.group_size == 4 and g.is_gqa
    assert [g.kv_head(h) for h in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert all(g.kv_head(h) == h // 4 for h in range(8))
    assert g.q_rows(0) == slice(0, 8)
    assert g.q_rows(3) == slice(24, 32)
    assert g.q_rows(7) == slice(56, 64)
    assert g.kv_rows(0) == slice(0, 8)
    assert g.kv_rows(1) == slice(8, 16)
    # the original config is untouched
    assert adapter_for(model.config).geometry(model.config).n_heads == 4


def test_geometry_explicit_head_dim_wins():
    """A text config that states head_dim (hidden != heads * head_dim) is taken at its word."""
    from transformers import LlamaConfig

    tc = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                     num_hidden_layers=3)
    g = ADAPTERS["llava_next"].geometry(tc)
    assert (g.n_layers, g.n_heads, g.n_kv_heads, g.head_dim, g.group_size) == (3, 4, 1, 32, 4)
    assert g.q_rows(2) == slice(64, 96)


def test_geometry_mha_and_bad_split():
    g = Geometry(n_layers=2, n_heads=4, n_kv_heads=4, head_dim=16, hidden_size=64)
    assert g.group_size == 1 and not g.is_gqa
    assert [g.kv_head(h) for h in range(4)] == [0, 1, 2, 3]
    assert g.cross_layers == ()
    with pytest.raises(ValueError, match="6 query heads"):
        Geometry(n_layers=2, n_heads=6, n_kv_heads=4, head_dim=16, hidden_size=96)


@pytest.mark.parametrize("name", ["llava_next_mistral", "qwen2_vl", "qwen2_5_vl", "mllama"])
def test_gqa_weight_layout(tiny, name):
    model, _ = tiny(name)
    adapter = adapter_for(model.config)
    g = adapter.geometry(model.config)
    assert g.is_gqa
    for i in range(g.n_layers):
        attn = adapter.attention(model, i)
        assert attn.q_proj.out_features == g.n_heads * g.head_dim
        assert attn.k_proj.out_features == g.n_kv_heads * g.head_dim
        assert attn.v_proj.out_features == g.n_kv_heads * g.head_dim
        assert attn.o_proj.in_features == g.n_heads * g.head_dim
        assert attn.o_proj.out_features == g.hidden_size
        assert attn.q_proj.in_features == g.hidden_size
        assert attn.q_proj.weight[g.q_rows(g.n_heads - 1)].shape == (g.head_dim, g.hidden_size)
        assert attn.k_proj.weight[g.kv_rows(g.n_kv_heads - 1)].shape == (g.head_dim, g.hidden_size)
        assert attn.o_proj.weight[:, g.q_rows(g.n_heads - 1)].shape == (g.hidden_size, g.head_dim)


# --------------------------------------------------------------------------- prunable linears


@pytest.mark.parametrize("name", NAMES)
def test_prunable_linears(tiny, name):
    model, _ = tiny(name)
    adapter = adapter_for(model.config)
    n_layers, cross = EXPECTED[name][2], EXPECTED[name][8]
    lin = adapter.prunable_linears(model)

    expected = []
    for i in range(n_layers):
        attn = "cross_attn" if i in cross else "self_attn"
        expected += [f"layers.{i}.{attn}.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        expected += [f"layers.{i}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    assert list(lin) == expected  # exact keys, layer-major
    assert len(lin) == 7 * n_layers
    assert adapter.prunable_names(model.config) == expected
    assert ATTN_PARTS + MLP_PARTS == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    if cross:
        assert not any(k.startswith(f"layers.{cross[0]}.self_attn") for k in lin)

    lm = adapter.language_model(model)
    assert lm is model.model.language_model
    lm_modules = {id(m) for m in lm.modules()}
    assert all(isinstance(m, nn.Linear) for m in lin.values())
    assert all(id(m) in lm_modules for m in lin.values())
    assert len({id(m) for m in lin.values()}) == len(lin)  # distinct modules
    for k, m in lin.items():
        assert lm.get_submodule(k) is m

    # nothing from the vision tower, the projector, the embeddings or lm_head
    assert all(m is not model.lm_head for m in lin.values())
    assert all(m is not model.get_input_embeddings() for m in lin.values())
    excluded = set()
    for full, mod in model.named_modules():
        top = full.split(".")
        if top[:1] == ["lm_head"] or (len(top) >= 2 and top[0] == "model" and top[1] != "language_model"):
            excluded.add(id(mod))
        if "embed" in full:
            excluded.add(id(mod))
    n_vision = sum(1 for full, _ in model.named_modules()
                   if any(s in full for s in ("vision", "visual", "multi_modal_projector")))
    assert n_vision > 0
    assert not any(id(m) in excluded for m in lin.values())
    # the full names of the prunable modules all sit under the language model's decoder layers
    full_names = {id(mod): full for full, mod in model.named_modules()}
    for k, m in lin.items():
        assert full_names[id(m)] == f"model.language_model.{k}"


# --------------------------------------------------------------------------- chat style + adapter_for


@pytest.mark.parametrize("name", NAMES)
def test_chat_style(tiny, name):
    _, processor = tiny(name)
    assert chat_style(processor) == EXPECTED[name][1]
    assert chat_style(processor.tokenizer) == EXPECTED[name][1]


def test_adapter_for_unknown_family():
    with pytest.raises(ValueError, match="llama_vision_xl"):
        adapter_for(None, "llama_vision_xl")
    for fam in ("llava_next", "qwen2_vl", "qwen2_5_vl", "mllama"):
        assert adapter_for(None, fam).family == fam


def test_adapter_for_unsupported_model_type():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=64)
    with pytest.raises(ValueError, match="'llama'"):
        adapter_for(cfg)


# --------------------------------------------------------------------------- load_model errors


def test_load_model_unknown_tiny_lists_names():
    with pytest.raises(ModelError) as ei:
        load_model("tiny:nope", device="cpu")
    msg = str(ei.value)
    assert "tiny:nope" in msg
    for name in TINY_MODELS:
        assert f"tiny:{name}" in msg
    with pytest.raises(ModelError, match="tiny:nope"):
        load_processor_only("tiny:nope")


def test_load_model_missing_local_path(tmp_path):
    missing = tmp_path / "no_such_model_dir"
    with pytest.raises(ModelError, match="no_such_model_dir"):
        load_model(str(missing), device="cpu")


def test_load_model_family_mismatch():
    with pytest.raises(ModelError, match="qwen2_vl"):
        load_model("tiny:llava_next", family="qwen2_vl", device="cpu")


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want
    assert resolve_device().type == want
    for bad in ("gpu0", "GPU", "cuda0", "tpu", ""):
        with pytest.raises(ModelError, match="device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA"):
            resolve_device("cuda:0")


def test_resolve_dtype():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) is torch.float32
    assert resolve_dtype("bfloat16", cpu) is torch.bfloat16
    assert resolve_dtype("float16", cpu) is torch.float16
    assert resolve_dtype("float32", cpu) is torch.float32
    with pytest.raises(ModelError, match="fp8"):
        resolve_dtype("fp8", cpu)


def test_load_model_tiny_dtype_and_properties():
    lm = load_model("tiny:qwen2_vl", device="cpu", dtype="bfloat16")
    assert isinstance(lm, LoadedModel)
    assert lm.dtype is torch.bfloat16 and lm.device == torch.device("cpu")
    assert all(p.dtype == torch.bfloat16 for p in lm.model.parameters())
    assert lm.family == "qwen2_vl" and lm.chat_style == "qwen"
    assert lm.geometry.n_kv_heads == 2
    assert lm.layers is lm.model.model.language_model.layers
    assert len(lm.prunable_linears()) == 28
    assert not lm.model.training


# --------------------------------------------------------------------------- save / load round trip


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip(tmp_path, two_images, name):
    image = two_images[1]
    src = load_model(f"tiny:{name}", device="cpu")
    out = src.save(tmp_path / name)
    assert out == tmp_path / name and (out / "config.json").is_file()

    dst = load_model(str(out), device="cpu")
    assert dst.family == src.family == EXPECTED[name][0]
    assert dst.chat_style == src.chat_style == EXPECTED[name][1]
    assert type(dst.processor).__name__ == type(src.processor).__name__
    assert dst.dtype is torch.float32
    assert dst.geometry == src.geometry

    # the processors render and encode identically
    text_src = prompt_text(src.processor, QUESTION, src.adapter)
    text_dst = prompt_text(dst.processor, QUESTION, dst.adapter)
    assert text_src == text_dst
    e_src = encode(src.processor, [text_src], [image])
    e_dst = encode(dst.processor, [text_dst], [image])
    assert set(e_src.keys()) == set(e_dst.keys())
    for k in e_src.keys():
        assert torch.equal(e_src[k], e_dst[k]), f"{name}: processor input {k!r} differs after reload"

    with torch.no_grad():
        l_src = src.model(**e_src).logits
        l_dst = dst.model(**e_dst).logits
    assert torch.equal(l_src, l_dst)

    proc = load_processor_only(str(out))
    assert type(proc).__name__ == type(src.processor).__name__
    assert chat_style(proc) == EXPECTED[name][1]
    e_p = encode(proc, [prompt_text(proc, QUESTION, src.adapter)], [image])
    assert torch.equal(e_p["input_ids"], e_src["input_ids"])
