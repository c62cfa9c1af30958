"""Ships: ablation hooks, the three head scores on hand-made inputs, head selection, the fast
engine against the naive loop, and the resumable step."""

import json
import math

import pytest
import torch

from hsr_lib.ablation import ablate
from hsr_lib.models import load_model
from hsr_lib.prompts import encode_prompt
from hsr_lib.ships import (dumps_authors, hidden0_angle, kl_per_prompt, load_head_scores, parse_key, ranks,
                           select_heads, subspace_angle, subspace_angle_arccos)
from hsr_lib.ships_engine import AblationConfig, ships_engine, ships_naive

FAMILIES = ["llava_next_vicuna", "llava_next_mistral", "llava_next_llama3", "qwen2_vl", "qwen2_5_vl", "mllama"]


@pytest.fixture(scope="module")
def lms():
    cache = {}

    def get(name, attn="sdpa"):
        if (name, attn) not in cache:
            cache[name, attn] = load_model(f"tiny:{name}", attn_implementation=attn)
        return cache[name, attn]

    return get


@pytest.fixture(scope="module")
def prompts(synthetic_vlguard):
    _, _, splits = synthetic_vlguard
    return splits["safety"][:3]


def _logits(lm, enc):
    with torch.no_grad():
        return lm.model(**enc).logits


# ----------------------------------------------------------------------------- hooks


@pytest.mark.parametrize("name", FAMILIES)
def test_epsilon_one_bitwise_against_no_hooks(lms, prompts, name):
    lm = lms(name)
    enc = encode_prompt(lm.processor, prompts[0])
    base = _logits(lm, enc)
    heads = [(l, h) for l in range(lm.geometry.n_layers) for h in range(lm.geometry.n_heads)]
    with ablate(lm, [heads], epsilon=1.0):
        assert torch.equal(_logits(lm, enc), base)


@pytest.mark.parametrize("name,slot_bug", [("llava_next_vicuna", False), ("llava_next_mistral", False),
                                           ("llava_next_mistral", True), ("mllama", False)])
def test_v_part_to_zero_equals_zeroing_o_proj_columns(name, slot_bug, prompts):
    lm = load_model(f"tiny:{name}")  # weights are edited: a private copy
    enc = encode_prompt(lm.processor, prompts[0])
    geo = lm.geometry
    layer, head = (2, 3) if name != "mllama" else (2, 3)  # mllama: layer 2 is its cross-attention layer
    with ablate(lm, [[(layer, head)]], epsilon=1e-30, parts=["v"], gqa_slot_bug=slot_bug):
        ablated = _logits(lm, enc)
    slot = geo.kv_head(head) if slot_bug else head
    o = lm.adapter.attention(lm.model, layer).o_proj
    with torch.no_grad():
        o.weight[:, geo.q_rows(slot)] = 0
    assert torch.allclose(ablated, _logits(lm, enc), atol=1e-6, rtol=0)


def test_k_part_under_gqa_is_shared_by_the_group(lms, prompts):
    lm = lms("llava_next_mistral")  # 4 query heads, 2 KV heads: heads 0 and 1 share KV head 0
    enc = encode_prompt(lm.processor, prompts[0])
    with ablate(lm, [[(1, 0)]], parts=["k"]):
        a = _logits(lm, enc)
    with ablate(lm, [[(1, 1)]], parts=["k"]):
        b = _logits(lm, enc)
    with ablate(lm, [[(1, 2)]], parts=["k"]):
        c = _logits(lm, enc)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_q_part_scales_only_its_slice(lms, prompts):
    lm = lms("qwen2_vl")
    enc = encode_prompt(lm.processor, prompts[0])
    q = lm.adapter.attention(lm.model, 1).q_proj
    got = []
    with ablate(lm, [[(1, 2)]], epsilon=0.5, parts=["q"]):
        # registered after the ablation hook, so it sees the ablated output
        rec = q.register_forward_hook(lambda m, a, o: got.append((a[0], o)))
        try:
            _logits(lm, enc)
        finally:
            rec.remove()
    x, out = got[0]
    expected = torch.nn.functional.linear(x, q.weight, q.bias)  # bias included, then scaled
    expected[..., 32:48] *= 0.5
    assert torch.equal(out, expected)


@pytest.mark.parametrize("name", ["llava_next_vicuna", "qwen2_5_vl", "mllama"])
def test_batched_rows_equal_single_runs(lms, prompts, name):
    lm = lms(name)
    enc = encode_prompt(lm.processor, prompts[0])
    rows = [[], [(2, 1)], [(0, 0), (3, 3)]]
    batch = {k: (torch.cat([v] * 3) if isinstance(v, torch.Tensor) and v.shape[0] == 1 else v) for k, v in enc.items()}
    if "image_grid_thw" in enc:  # Qwen: patches are flattened over images
        batch["pixel_values"] = torch.cat([enc["pixel_values"]] * 3)
        batch["image_grid_thw"] = torch.cat([enc["image_grid_thw"]] * 3)
    with ablate(lm, rows):
        out = _logits(lm, batch)
    for b, heads in enumerate(rows):
        with ablate(lm, [heads]):
            single = _logits(lm, enc)
        assert torch.allclose(out[b], single[0], atol=1e-5, rtol=0)


def test_ablation_works_inside_generate(lms, prompts):
    lm = lms("llava_next_llama3")
    enc = encode_prompt(lm.processor, prompts[0])
    gen = lambda: lm.model.generate(**enc, max_new_tokens=6, do_sample=False)  # noqa: E731
    plain = gen()
    with ablate(lm, [[(0, h) for h in range(4)] + [(1, h) for h in range(4)]], epsilon=1e-5):
        ablated = gen()
    with ablate(lm, [[(0, 0)]], epsilon=1.0):
        same = gen()
    assert torch.equal(plain, same) and not torch.equal(plain, ablated)


def test_bad_ablation_arguments(lms):
    lm = lms("qwen2_vl")
    for kwargs, match in [({"parts": ["x"]}, "parts"), ({"parts": []}, "parts"), ({"epsilon": 0}, "epsilon")]:
        with pytest.raises(ValueError, match=match):
            with ablate(lm, [[(0, 0)]], **kwargs):
                pass
    with pytest.raises(ValueError, match=r"\(9, 0\)"):
        with ablate(lm, [[(9, 0)]]):
            pass


# ----------------------------------------------------------------------------- scores by hand


def test_kl_by_hand():
    # p = (1/2, 1/2), q = (1/4, 3/4): KL = ½ ln 2 + ½ ln(2/3) = ½ ln(4/3)
    f64 = dict(dtype=torch.float64)
    kl = kl_per_prompt(torch.tensor([[0.0, 0.0]], **f64), torch.tensor([[0.0, math.log(3.0)]], **f64))
    assert kl.item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-11)
    assert kl_per_prompt(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 2.0]])).item() == 0.0


@pytest.mark.parametrize("deg", [0.0, 1e-4, 3.0, 30.0, 60.0, 89.0, 90.0])
def test_subspace_angle_rank_one_by_hand(deg):
    t = math.radians(deg)
    X = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)  # column space e1 of R^3
    Xt = torch.tensor([[math.cos(t), 0.0], [math.sin(t), 0.0], [0.0, 0.0]], dtype=torch.float64)
    assert subspace_angle(X, Xt, 1) == pytest.approx(deg, abs=1e-9)
    if deg >= 1:
        assert subspace_angle_arccos(X, Xt, 1) == pytest.approx(deg, abs=1e-6)


def test_subspace_angle_two_dims_by_hand():
    # span{e1, e2} vs span{e1, cos t e2 + sin t e3}: principal angles 0 and t
    t = math.radians(25.0)
    X = torch.tensor([[3.0, 0.0], [0.0, 2.0], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    Xt = torch.tensor([[3.0, 0.0], [0.0, 2 * math.cos(t)], [0.0, 2 * math.sin(t)], [0.0, 0.0]], dtype=torch.float64)
    assert subspace_angle(X, Xt, 2) == pytest.approx(25.0, abs=1e-9)
    assert subspace_angle(X, Xt, 1) == pytest.approx(0.0, abs=1e-9)  # top direction e1 is shared


def test_subspace_angle_equals_textbook_arccos_on_random_data():
    g = torch.Generator().manual_seed(0)
    X, Xt = torch.randn(16, 40, generator=g), torch.randn(16, 40, generator=g)
    for r in (1, 2, 5):
        assert subspace_angle(X, Xt, r) == pytest.approx(subspace_angle_arccos(X, Xt, r), abs=1e-8)


def test_hidden0_angle_by_hand():
    X = torch.tensor([[1.0, 5.0], [0.0, 7.0]])
    assert hidden0_angle(X, torch.tensor([[1.0, 0.0], [1.0, 0.0]])) == pytest.approx(45.0, abs=1e-12)
    assert hidden0_angle(X, torch.tensor([[-2.0, 9.0], [-2.0, 9.0]])) == pytest.approx(45.0, abs=1e-12)  # |cos|
    assert hidden0_angle(X, torch.tensor([[0.0, 1.0], [3.0, 1.0]])) == pytest.approx(90.0, abs=1e-12)
    assert hidden0_angle(X, 4 * X) == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------- selection and format


def test_select_heads_global_with_layer_major_ties():
    s = {"1-0": 5.0, "0-1": 5.0, "0-0": 7.0, "2-3": 5.0, "10-0": 1.0, "9-2": 6.0}
    assert select_heads(s, 3) == [(0, 0), (9, 2), (0, 1)]
    assert select_heads(s, 5) == [(0, 0), (9, 2), (0, 1), (1, 0), (2, 3)]
    assert ranks(s)["10-0"] == 6
    with pytest.raises(ValueError):
        select_heads(s, 0)


def test_authors_format_round_trip(tmp_path):
    s = {"10-0": 1.5, "2-1": 0.25, "2-0": 3.0, "9-3": 2.0}
    text = dumps_authors(s)
    assert "\n" not in text and list(json.loads(text)) == ["2-0", "2-1", "9-3", "10-0"]
    (tmp_path / "s.jsonl").write_text(text + "\n")
    assert load_head_scores(tmp_path / "s.jsonl") == s
    (tmp_path / "bad.json").write_text('{"a-b": 1}')
    with pytest.raises(ValueError, match="a-b"):
        load_head_scores(tmp_path / "bad.json")
    assert parse_key("31-22") == (31, 22)


# ----------------------------------------------------------------------------- engine == naive


def _compare(a, b, tol=1e-5):
    for name in ("kl", "subspace", "hidden0_angle"):
        assert a[name].keys() == b[name].keys()
        for k in a[name]:
            assert a[name][k] == pytest.approx(b[name][k], abs=tol, rel=tol), (name, k)


@pytest.mark.parametrize("name,cfg", [
    ("llava_next_vicuna", AblationConfig()),
    ("llava_next_mistral", AblationConfig()),
    ("llava_next_mistral", AblationConfig(gqa_slot_bug=True, r_max=2)),
    ("qwen2_vl", AblationConfig()),
    ("mllama", AblationConfig()),
    ("llava_next_llama3", AblationConfig(non_causal=True, parts=("q", "v"))),
])
def test_engine_equals_naive_loop(lms, prompts, name, cfg):
    lm = lms(name)
    enc = [encode_prompt(lm.processor, s) for s in prompts]
    fast = ships_engine(lm, enc, cfg, batch_heads=3, progress=False)
    _compare(fast, ships_naive(lm, enc, cfg))
    assert len(fast["kl"]) == lm.geometry.n_layers * lm.geometry.n_heads


def test_engine_resumes_from_saved_layers(lms, prompts):
    lm = lms("qwen2_vl")
    enc = [encode_prompt(lm.processor, s) for s in prompts]
    saved = {}
    with pytest.raises(KeyboardInterrupt):
        def die_after_two(layer, scores):
            saved[layer] = scores
            if len(saved) == 2:
                raise KeyboardInterrupt
        ships_engine(lm, enc, batch_heads="auto", on_layer=die_after_two, progress=False)
    assert sorted(saved) == [0, 1]
    fresh = []
    resumed = ships_engine(lm, enc, done=saved, on_layer=lambda l, s: fresh.append(l), progress=False)
    assert fresh == [2, 3]
    _compare(resumed, ships_engine(lm, enc, progress=False), tol=1e-9)


def test_non_causal_changes_scores_and_needs_sdpa(lms, prompts):
    lm = lms("llava_next_vicuna")
    enc = [encode_prompt(lm.processor, s) for s in prompts[:2]]
    a = ships_engine(lm, enc, AblationConfig(), progress=False)
    b = ships_engine(lm, enc, AblationConfig(non_causal=True), progress=False)
    assert a["kl"] != b["kl"]
    with pytest.raises(ValueError, match="sdpa"):
        ships_engine(lms("llava_next_vicuna", "eager"), enc, AblationConfig(non_causal=True), progress=False)


def test_step_resumes_from_matching_layers_only(tmp_path, monkeypatch):
    import shutil
    from pathlib import Path

    from hsr_lib.io import atomic_write_json, read_json
    from hsr_lib.params import load_params
    from hsr_lib.runs import Run
    from hsr_lib.steps import ships as ships_step

    tiny = Path(__file__).resolve().parent.parent / "params" / "tiny.yaml"
    P = load_params(tiny, [f"runs_dir={tmp_path}", "data.n_ships=2", "model.name=tiny:qwen2_vl"])
    run = Run.open(P)
    first = ships_step.run(run, progress=False)
    # simulate an attempt killed after layer 1, with a leftover layer 0 from other params
    stage = run.staging(ships_step.spec(P))
    shutil.copytree(first.dir / "layers", stage / "layers")
    shutil.rmtree(first.dir)
    for layer in (2, 3):
        (stage / "layers" / f"layer_{layer:03d}.json").unlink()
    stale = read_json(stage / "layers" / "layer_000.json")
    atomic_write_json(stage / "layers" / "layer_000.json", {**stale, "fingerprint": "other-params"})
    seen = {}
    real = ships_step.ships_engine

    def spy(lm, prompts, cfg, batch, done, on_layer, progress):
        seen["done"] = sorted(done)
        return real(lm, prompts, cfg, batch, done, on_layer, progress)

    monkeypatch.setattr(ships_step, "ships_engine", spy)
    again = ships_step.run(Run.open(P), progress=False)
    assert seen["done"] == [1]
    assert again.scores == pytest.approx(first.scores, rel=1e-9)
    assert read_json(again.dir / "layers" / "layer_000.json")["fingerprint"] != "other-params"
    assert not stage.exists()
