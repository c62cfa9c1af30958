"""Tests for hsr_lib.prompts: chat-template prompts, calibration samples and response spans (docs/method.md)."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from hsr_lib.adapters import adapter_for, chat_style
from hsr_lib.data import DataError, Sample
from hsr_lib.prompts import (
    CalibrationSample,
    conversation_text,
    encode,
    encode_calibration,
    encode_prompt,
    prompt_text,
    render_tokens,
    response_span,
)
from hsr_lib.tiny import TINY_MODELS

NAMES = list(TINY_MODELS)
LLAMA3 = {"llava_next_llama3", "mllama"}
IMAGE_TOKEN = {"llava_next": "<image>", "llava_next_vicuna": "<image>", "llava_next_mistral": "<image>",
               "llava_next_llama3": "<image>", "qwen2_vl": "<|image_pad|>", "qwen2_5_vl": "<|image_pad|>",
               "mllama": "<|image|>"}


@pytest.fixture(scope="module")
def samples(synthetic_vlguard):
    """One safety sample (harmful question, refusal) and one utility sample (helpful answer)."""
    _, _, splits = synthetic_vlguard
    return {"safety": splits["safety"][0], "utility": splits["utility"][0]}


def _messages(question, response=None):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if response is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": response}]})
    return msgs


def _independent_ids(processor, sample, with_response: bool) -> torch.Tensor:
    """Token ids computed directly with the processor (not through hsr_lib.prompts)."""
    from PIL import Image

    text = processor.apply_chat_template(
        _messages(sample.question, sample.response if with_response else None),
        add_generation_prompt=not with_response, tokenize=False)
    with Image.open(sample.image) as im:
        image = im.convert("RGB")
    return processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0]


# --------------------------------------------------------------------------- prompt texts


@pytest.mark.parametrize("name", NAMES)
def test_prompt_and_conversation_text(tiny, samples, name):
    _, processor = tiny(name)
    s = samples["utility"]
    adapter = adapter_for(tiny(name)[0].config)
    p = prompt_text(processor, s.question, adapter)
    c = conversation_text(processor, s.question, s.response, adapter)
    assert s.question in p and s.response not in p
    assert s.question in c and s.response in c
    assert c.index(s.question) < c.index(s.response)
    assert p.index(IMAGE_TOKEN[name]) < p.index(s.question)  # image first, then question
    assert c.startswith(p)


# --------------------------------------------------------------------------- calibration spans


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["safety", "utility"])
def test_encode_calibration_paper(tiny, samples, name, kind):
    model, processor = tiny(name)
    adapter = adapter_for(model.config)
    s = samples[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the prompt must be a prefix: no warning
        cs = encode_calibration(processor, s, "paper", adapter)
    assert isinstance(cs, CalibrationSample) and cs.id == s.id
    ids = cs.input_ids
    prompt_ids = _independent_ids(processor, s, with_response=False)
    full_ids = _independent_ids(processor, s, with_response=True)
    assert torch.equal(ids, full_ids)
    assert torch.equal(ids[: len(prompt_ids)], prompt_ids)  # the prompt is a prefix
    assert cs.start == len(prompt_ids)
    assert cs.end == len(ids) == len(full_ids)
    assert cs.n_response == cs.end - cs.start > 0
    kept = processor.tokenizer.decode(ids[cs.start:cs.end], skip_special_tokens=True).strip()
    assert kept == s.response


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["safety", "utility"])
def test_encode_calibration_reference(tiny, samples, name, kind):
    model, processor = tiny(name)
    adapter = adapter_for(model.config)
    tok = processor.tokenizer
    s = samples[kind]
    paper = encode_calibration(processor, s, "paper", adapter)
    ref = encode_calibration(processor, s, "reference", adapter)
    assert torch.equal(ref.input_ids, paper.input_ids)
    ids = ref.input_ids
    kept = tok.decode(ids[ref.start:ref.end], skip_special_tokens=True).strip()
    assert kept == s.response
    if name in LLAMA3:
        assert chat_style(processor) == "llama3"
        assert (ref.start, ref.end) == (paper.start - 1, paper.end - 1)
        prompt_ids = _independent_ids(processor, s, with_response=False)
        assert ids[ref.start].item() == prompt_ids[-1].item()  # the last prompt token is kept
        assert ids[-1].item() == tok.convert_tokens_to_ids("<|eot_id|>")
        assert ref.end == len(ids) - 1  # ... and the final <|eot_id|> dropped
        assert not ref.response_mask()[-1] and ref.response_mask()[paper.start - 1]
    else:
        assert (ref.start, ref.end) == (paper.start, paper.end)


def test_response_span_cases():
    assert response_span(10, 15, "llama3", "paper") == (10, 15)
    assert response_span(10, 15, "llama3", "reference") == (9, 14)
    assert response_span(10, 15, "llama3") == (10, 15)  # paper is the default
    for style in ("vicuna", "mistral", "qwen"):
        assert response_span(10, 15, style, "paper") == (10, 15)
        assert response_span(10, 15, style, "reference") == (10, 15)
    assert response_span(1, 2, "llama3", "reference") == (0, 1)
    assert response_span(7, 100, "qwen", "reference") == (7, 100)


def test_labels_and_mask(tiny, samples):
    model, processor = tiny("qwen2_vl")
    cs = encode_calibration(processor, samples["safety"], "paper", adapter_for(model.config))
    labels = cs.labels()
    n = cs.input_ids.shape[0]
    assert labels.shape == (1, n)
    assert labels.dtype == cs.input_ids.dtype
    assert (labels[0, : cs.start] == -100).all()
    assert (labels[0, cs.end:] == -100).all()
    assert torch.equal(labels[0, cs.start:cs.end], cs.input_ids[cs.start:cs.end])
    mask = cs.response_mask()
    assert mask.dtype == torch.bool and mask.shape == (n,)
    assert mask.sum().item() == cs.end - cs.start == cs.n_response
    assert torch.equal(mask, labels[0] != -100)
    # a hand-made sample
    hand = CalibrationSample("x", {"input_ids": torch.tensor([[5, 6, 7, 8, 9]])}, 2, 4)
    assert hand.labels().tolist() == [[-100, -100, 7, 8, -100]]
    assert hand.response_mask().tolist() == [False, False, True, True, False]
    assert hand.n_response == 2


@pytest.mark.parametrize("name", NAMES)
def test_model_runs_on_calibration_inputs(tiny, samples, name):
    model, processor = tiny(name)
    cs = encode_calibration(processor, samples["utility"], "reference", adapter_for(model.config))
    with torch.no_grad():
        out = model(**cs.inputs)
    vocab = model.config.get_text_config().vocab_size
    assert vocab == len(processor.tokenizer)
    assert out.logits.shape == (1, cs.input_ids.shape[0], vocab)
    assert torch.isfinite(out.logits).all()
    # HF loss with the sample's labels is finite
    with torch.no_grad():
        loss = model(**cs.inputs, labels=cs.labels()).loss
    assert torch.isfinite(loss)


# --------------------------------------------------------------------------- batching / padding


def _check_left_padding(processor, samples, image_pair):
    tok = processor.tokenizer
    tok.padding_side = "right"
    short = prompt_text(processor, "Hi?")
    long = prompt_text(processor, samples["safety"].question + " Please answer in detail.")
    enc = encode(processor, [short, long], list(image_pair))
    am = enc["attention_mask"]
    assert am.shape[0] == 2
    assert am[0, 0] == 0 and am[0, -1] == 1  # shorter one: zeros first (left padding)
    assert am[1].all()
    n_pad = int((am[0] == 0).sum())
    assert (am[0, :n_pad] == 0).all() and (am[0, n_pad:] == 1).all()
    assert (enc["input_ids"][0, :n_pad] == tok.pad_token_id).all()
    assert tok.padding_side == "right"  # restored


@pytest.mark.parametrize("name", [n for n in NAMES if n != "mllama"])
def test_encode_pads_left_and_restores(tiny, samples, two_images, name):
    _, processor = tiny(name)
    tok = processor.tokenizer
    old = tok.padding_side
    try:
        _check_left_padding(processor, samples, two_images)
        # restored even when the processor raises (two texts, one image)
        tok.padding_side = "right"
        with pytest.raises(Exception):
            encode(processor, [prompt_text(processor, "a"), prompt_text(processor, "bb")], [two_images[0]])
        assert tok.padding_side == "right"
    finally:
        tok.padding_side = old


def test_encode_batch_mllama(tiny, samples, two_images):
    _, processor = tiny("mllama")
    old = processor.tokenizer.padding_side
    try:
        _check_left_padding(processor, samples, two_images)
    finally:
        processor.tokenizer.padding_side = old


def test_encode_device_and_prompt(tiny, samples):
    model, processor = tiny("llava_next_llama3")
    enc = encode_prompt(processor, samples["safety"], adapter_for(model.config), device="cpu")
    assert enc["input_ids"].device.type == "cpu"
    assert enc["input_ids"].shape[0] == 1 and "pixel_values" in enc
    assert torch.equal(enc["input_ids"][0], _independent_ids(processor, samples["safety"], with_response=False))


# --------------------------------------------------------------------------- render_tokens


@pytest.mark.parametrize("name", ["llava_next_vicuna", "llava_next_llama3", "qwen2_vl", "mllama"])
def test_render_tokens(tiny, samples, name):
    model, processor = tiny(name)
    tok = processor.tokenizer
    s = samples["utility"]
    cs = encode_calibration(processor, s, "paper", adapter_for(model.config))
    ids = cs.input_ids.tolist()
    img = IMAGE_TOKEN[name]
    img_id = tok.convert_tokens_to_ids(img)
    n_img = ids.count(img_id)
    assert n_img >= 1

    plain = render_tokens(tok, ids)
    if n_img > 1:
        assert f"{img}×{n_img}" in plain
        assert plain.count(img) == 1
    else:
        assert img in plain and "×" not in plain
    assert s.question in plain and s.response in plain

    marker = " ▶ "
    text = render_tokens(tok, ids, mark=cs.start, marker=marker)
    assert text.count(marker) == 1
    before, after = text.split(marker)
    assert before == render_tokens(tok, ids[: cs.start])
    assert after == render_tokens(tok, ids[cs.start:])
    assert after == tok.decode(ids[cs.start:], skip_special_tokens=False)
    assert tok.decode(ids[cs.start:], skip_special_tokens=True).strip() == s.response
    assert after.strip().startswith(s.response)
    assert text.replace(marker, "") == plain


def test_render_tokens_hand_cases(tiny):
    _, processor = tiny("qwen2_vl")
    tok = processor.tokenizer
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    vs, ve = tok.convert_tokens_to_ids("<|vision_start|>"), tok.convert_tokens_to_ids("<|vision_end|>")
    ab = tok.encode("ab", add_special_tokens=False)
    assert len(ab) == 2  # byte-level, no merges
    ids = ab + [vs, pad, pad, pad, ve] + ab
    assert render_tokens(tok, ids) == "ab<|vision_start|><|image_pad|>×3<|vision_end|>ab"
    assert render_tokens(tok, ids, mark=0, marker="|") == "|ab<|vision_start|><|image_pad|>×3<|vision_end|>ab"
    assert render_tokens(tok, ids, mark=1, marker="|") == "a|b<|vision_start|><|image_pad|>×3<|vision_end|>ab"
    # a mark inside a run of placeholders splits the run
    assert render_tokens(tok, ids, mark=4, marker="|") == "ab<|vision_start|><|image_pad|>|<|image_pad|>×2<|vision_end|>ab"
    assert render_tokens(tok, ids, mark=len(ids) - 2, marker="|") == \
        "ab<|vision_start|><|image_pad|>×3<|vision_end|>|ab"
    assert render_tokens(tok, [pad]) == "<|image_pad|>"
    assert render_tokens(tok, []) == ""


# --------------------------------------------------------------------------- bad data


def test_missing_image_names_record(tiny, samples, tmp_path):
    model, processor = tiny("llava_next")
    adapter = adapter_for(model.config)
    bad = dataclasses.replace(samples["safety"], id="rec_missing_42", image=str(tmp_path / "gone.png"))
    assert isinstance(bad, Sample)
    with pytest.raises(DataError, match="rec_missing_42"):
        encode_calibration(processor, bad, "paper", adapter)
    with pytest.raises(DataError, match="gone.png"):
        encode_calibration(processor, bad, "reference", adapter)
    with pytest.raises(DataError, match="rec_missing_42"):
        encode_prompt(processor, bad, adapter)
