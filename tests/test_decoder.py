"""decoder.trace records each layer's own keyword arguments, also when layers differ (issue: a
sliding-window layer must not get layer 0's full-attention mask)."""

from __future__ import annotations

import torch

from hsr_lib.adapters import adapter_for
from hsr_lib.decoder import finish, replay, trace
from hsr_lib.models import LoadedModel
from hsr_lib.prompts import encode_prompt
from hsr_lib.tiny import build_tiny


def sliding_lm() -> LoadedModel:
    """tiny:qwen2_5_vl with layers 1 and 3 attending through a 3-token sliding window."""
    from transformers import AutoModelForImageTextToText

    model, proc = build_tiny("qwen2_5_vl")
    tc = model.config.text_config
    tc.use_sliding_window, tc.sliding_window = True, 3
    tc.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(model.config).eval()
    return LoadedModel(model, proc, adapter_for(model.config), "tiny:qwen2_5_vl+sliding", torch.device("cpu"),
                       torch.float32)


def same(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def test_first_trace_records_each_layers_own_mask(synthetic_vlguard):
    lm = sliding_lm()
    enc = encode_prompt(lm.processor, synthetic_vlguard[2]["safety"][0])
    first, full = trace(lm, enc, keep="first"), trace(lm, enc, keep="all")
    masks = [kw["attention_mask"] for kw in first.kwargs]
    assert not same(masks[0], masks[1]) and same(masks[1], masks[3])  # the layers really differ
    for i in range(4):
        assert same(masks[i], full.kwargs[i]["attention_mask"]), i
    assert first.hidden[1] is None and torch.equal(first.hidden[0], full.hidden[0])
    # replaying every layer from layer 0's input gives the model's own final state
    h, logits = finish(lm, replay(lm, first, 0, first.hidden[0]))
    assert torch.allclose(h, full.final[:, -1], atol=1e-5) and torch.allclose(logits, full.logits, atol=1e-4)


def test_first_trace_leaves_the_layers_as_they_were(synthetic_vlguard):
    lm = sliding_lm()
    enc = encode_prompt(lm.processor, synthetic_vlguard[2]["safety"][0])
    before = lm.model(**enc).logits
    trace(lm, enc, keep="first")
    assert all("forward" not in layer.__dict__ for layer in lm.layers)
    assert torch.equal(lm.model(**enc).logits, before)
