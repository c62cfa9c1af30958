"""Generation: batched greedy decoding with left padding (equal to one prompt at a time), stopping
at EOS, and the resumable JSONL store."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hsr_lib.evaluate import generate as G
from hsr_lib.evaluate.benchmarks import load_benchmark
from hsr_lib.evaluate.generate import ResponseStore, generate_batch, generate_responses, stop_ids
from hsr_lib.io import read_jsonl
from hsr_lib.models import load_model

FIX = Path(__file__).resolve().parent / "fixtures" / "eval"
ROOTS = {"mmbench": str(FIX / "mmbench"), "vlguard": str(FIX / "vlguard"), "safebench": str(FIX / "safebench")}


@pytest.fixture(scope="module")
def items():
    """Prompts of different lengths, with different images (one FigStep rendering among them)."""
    return (load_benchmark("vlguard_safe_unsafe", ROOTS, n_items=3) + load_benchmark("mmbench", ROOTS, n_items=2)
            + load_benchmark("safebench", ROOTS, n_items=1))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_next", "mllama"])
def test_batched_left_padded_equals_one_at_a_time(family, items):
    lm = load_model(f"tiny:{family}", dtype="float32", device="cpu")
    batched = generate_batch(lm, items[2:], 4)
    assert batched == [generate_batch(lm, [it], 4)[0] for it in items[2:]]
    assert all(isinstance(t, str) and 1 <= n <= 4 for t, n in batched)


def _stub(rows: list[list[int]], prompt_len: int = 3):
    """A LoadedModel stand-in whose generate returns fixed new tokens after a prompt of ``prompt_len``."""
    from hsr_lib.tiny import make_tokenizer

    tok = make_tokenizer("qwen")
    eos = tok.eos_token_id

    def generate(**kw):
        assert kw["do_sample"] is False and eos in kw["eos_token_id"] and kw["max_new_tokens"] == 5
        return torch.cat([torch.zeros(len(rows), prompt_len, dtype=torch.long), torch.tensor(rows)], dim=1)

    model = SimpleNamespace(generate=generate, generation_config=SimpleNamespace(eos_token_id=None))
    return SimpleNamespace(model=model, processor=SimpleNamespace(tokenizer=tok), adapter=None, device="cpu"), tok


def test_generation_stops_at_eos(monkeypatch, items):
    tok = _stub([[0], [0]])[1]
    eos, pad, h, i = tok.eos_token_id, tok.pad_token_id, tok.convert_tokens_to_ids("h"), tok.convert_tokens_to_ids("i")
    lm, _ = _stub([[h, i, eos, pad, pad], [h, h, h, h, h]])
    monkeypatch.setattr(G, "prompt_text", lambda processor, q, adapter: q)
    monkeypatch.setattr(G, "encode", lambda processor, texts, images, device: {"input_ids": torch.zeros(2, 3)})
    assert generate_batch(lm, items[:2], 5) == [("hi", 3), ("hhhhh", 5)]
    assert stop_ids(lm) == [eos]


def test_store_resumes_and_drops_other_configs(tmp_path, items, monkeypatch):
    calls = []

    def fake(lm, batch, max_new_tokens):
        calls.append([it.id for it in batch])
        return [(f"answer to {it.id}", 2) for it in batch]

    monkeypatch.setattr(G, "generate_batch", fake)
    path = tmp_path / "dense" / "bench.jsonl"
    rows = generate_responses(None, items[:5], "dense", ResponseStore(path, "cfg1"), 8, 2, progress=False)
    assert [len(c) for c in calls] == [2, 2, 1]
    assert [r["item_id"] for r in rows] == [it.id for it in items[:5]]
    assert len(items) == 6
    assert set(rows[0]) == {"benchmark", "item_id", "variant", "prompt", "response", "n_tokens", "config", "input",
                            "hash"}
    assert read_jsonl(path) == rows and not list(path.parent.glob("*.tmp"))
    # a re-run with the same config generates only what is missing
    calls.clear()
    rows = generate_responses(None, items, "dense", ResponseStore(path, "cfg1"), 8, 4, progress=False)
    assert calls == [[it.id for it in items[5:]]] and len(rows) == len(items)
    # an item whose prompt changed is generated again
    calls.clear()
    changed = [items[0].__class__(**{**items[0].__dict__, "question": "new prompt"})] + list(items[1:])
    generate_responses(None, changed, "dense", ResponseStore(path, "cfg1"), 8, 4, progress=False)
    assert calls == [[items[0].id]]
    # another config (e.g. max_new_tokens) starts afresh and rewrites the file with its rows only
    calls.clear()
    generate_responses(None, items[:2], "dense", ResponseStore(path, "cfg2"), 8, 4, progress=False)
    assert calls == [[it.id for it in items[:2]]]
    assert {r["config"] for r in read_jsonl(path)} == {"cfg2"} and len(read_jsonl(path)) == 2


def test_store_flushes_on_a_timer(tmp_path, items):
    path = tmp_path / "r.jsonl"
    store = ResponseStore(path, "c", flush_s=3600)
    row = store.row(items[0], "x", 1, "dense")
    store.add([row])
    assert not path.exists()  # not yet: the timer has not run out
    store.flush()
    assert read_jsonl(path) == [row]
    ResponseStore(path, "c", flush_s=0).add([store.row(items[1], "x", 1, "dense")])
    assert len(read_jsonl(path)) == 2  # flush_s=0 writes at once


def _answers(tmp_path, items, monkeypatch):
    """A saved answers file of ``items`` and a list that records which items get generated."""
    calls = []

    def fake(lm, batch, max_new_tokens):
        calls.append(it.id for it in batch)
        return [(f"answer to {it.id}", 2) for it in batch]

    monkeypatch.setattr(G, "generate_batch", fake)
    path = tmp_path / "dense" / "bench.jsonl"
    generate_responses(None, items, "dense", ResponseStore(path, "cfg"), 8, 8, progress=False)
    calls.clear()
    return path, calls


def test_an_edited_answer_is_named_and_generated_again_the_others_kept(tmp_path, items, monkeypatch, capsys):
    path, calls = _answers(tmp_path, items, monkeypatch)
    lines = path.read_text().splitlines()
    edited = json.loads(lines[2])
    edited["response"] = "I cannot help with that."  # valid JSON, a plausible answer: only its hash tells
    lines[2] = json.dumps(edited)
    lines[4] = lines[4][:20]  # a damaged line in the middle
    path.write_text("\n".join(lines) + "\n")
    rows = generate_responses(None, items, "dense", ResponseStore(path, "cfg"), 8, 8, progress=False)
    out = capsys.readouterr().out
    assert f"{path}: 2 answer row(s) fail their check: item {items[2].id!r} (line 3: edited or damaged), line 5 " \
           "(unreadable); generating them again (keeping 4 intact)" in out
    assert [i for c in calls for i in c] == [items[2].id, items[4].id]
    assert rows[2]["response"] == f"answer to {items[2].id}" and len(read_jsonl(path)) == len(items)


def test_a_cut_off_answers_file_is_named_and_completed(tmp_path, items, monkeypatch, capsys):
    path, calls = _answers(tmp_path, items, monkeypatch)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 30])  # as a full disk or a copy cut short leaves it
    rows = generate_responses(None, items, "dense", ResponseStore(path, "cfg"), 8, 8, progress=False)
    assert f"{path}: the file is cut off (line {len(items)} is an incomplete row)" in capsys.readouterr().out
    assert [i for c in calls for i in c] == [items[-1].id] and len(rows) == len(items)
    assert path.read_bytes() == data  # completed to what a clean run writes


def test_an_answer_is_keyed_by_the_image_it_saw(tmp_path, items, monkeypatch):
    import dataclasses
    import shutil

    from PIL import Image

    path, calls = _answers(tmp_path, items[:2], monkeypatch)
    img = tmp_path / "img.png"
    shutil.copy(items[0].image[0], img)
    moved = [dataclasses.replace(items[0], image=(str(img),)), items[1]]
    generate_responses(None, moved, "dense", ResponseStore(path, "cfg"), 8, 8, progress=False)
    assert calls == []  # the same bytes elsewhere: the same answer
    Image.new("RGB", (9, 9), (1, 2, 3)).save(img)  # same path and question, other content
    generate_responses(None, moved, "dense", ResponseStore(path, "cfg"), 8, 8, progress=False)
    assert [i for c in calls for i in c] == [items[0].id]
