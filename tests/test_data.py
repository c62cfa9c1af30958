"""Tests for hsr_lib.data: VLGuard loading, splits, sampling and bad-data errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hsr_lib.data import (
    DataError,
    Sample,
    check_images,
    load_records,
    load_samples,
    open_image,
    resolve_vlguard,
    sample,
    sample_indices,
    save_samples,
    split_records,
)


def _png(path: Path, size=(8, 6), colour=(255, 0, 0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _records() -> list[dict]:
    return [
        {"id": "u1", "image": "bad/a.png", "safe": False, "harmful_category": "privacy",
         "harmful_subcategory": "personal data",
         "instr-resp": [{"instruction": "Harm Q1", "response": "Refuse 1"}]},
        {"id": "s1", "image": "safe/b.png", "safe": True,
         "instr-resp": [{"safe_instruction": "Safe Q1", "response": "Help 1"},
                        {"unsafe_instruction": "Unsafe Q1", "response": "Refuse S1"}]},
        {"id": "u2", "image": "bad/c.png", "safe": False,
         "instr-resp": [{"instruction": "Harm Q2", "response": "Refuse 2"}]},
        # entries in the other order: found by key, not position
        {"id": "s2", "image": "safe/d.png", "safe": True, "harmful_category": "deception",
         "instr-resp": [{"unsafe_instruction": "Unsafe Q2", "response": "Refuse S2"},
                        {"safe_instruction": "Safe Q2", "response": "Help 2"}]},
    ]


def _write(root: Path, records) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    tj = root / "train.json"
    tj.write_text(json.dumps(records), encoding="utf-8")
    for r in records if isinstance(records, list) else []:
        if isinstance(r, dict) and isinstance(r.get("image"), str):
            _png(root / r["image"])
    return tj


# ---------------------------------------------------------------- sampling

@pytest.mark.parametrize("seed,n_total,n", [(114514, 500, 128), (0, 200, 128), (7, 10, 3), (1, 5, 5)])
def test_sample_indices_formula(seed, n_total, n):
    want = np.random.default_rng(seed).permutation(n_total)[:n]
    got = sample_indices(n_total, n, seed)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(sample_indices(n_total, n, seed), got)


def test_sample_items_and_oversize():
    items = [f"x{i}" for i in range(20)]
    idx = np.random.default_rng(114514).permutation(20)[:6]
    assert sample(items, 6, 114514) == [items[i] for i in idx]
    assert sample(items, 6, 114514) == sample(items, 6, 114514)
    allx = sample(items, 100, 3)
    assert sorted(allx) == sorted(items) and len(allx) == 20
    with pytest.raises(DataError, match="n must be >= 1"):
        sample(items, 0, 0)


# ---------------------------------------------------------------- splits

def test_splits_exact(tmp_path):
    tj = _write(tmp_path / "vlg", _records())
    tj_path, img_root = resolve_vlguard(tmp_path / "vlg")
    assert tj_path == tj.resolve() and img_root == (tmp_path / "vlg").resolve()
    splits = split_records(load_records(tj_path), img_root)
    assert set(splits) == {"safety", "utility", "safe_unsafe"}
    s = splits["safety"]
    assert [x.id for x in s] == ["u1", "u2"]
    assert [x.question for x in s] == ["Harm Q1", "Harm Q2"]
    assert [x.response for x in s] == ["Refuse 1", "Refuse 2"]
    assert [x.category for x in s] == ["privacy", None]
    assert s[0].image == str((tmp_path / "vlg" / "bad/a.png").resolve())
    assert Path(s[0].image).is_absolute()
    u = splits["utility"]
    assert [(x.id, x.question, x.response) for x in u] == [("s1", "Safe Q1", "Help 1"), ("s2", "Safe Q2", "Help 2")]
    su = splits["safe_unsafe"]
    assert [(x.id, x.question, x.response) for x in su] == [
        ("s1", "Unsafe Q1", "Refuse S1"), ("s2", "Unsafe Q2", "Refuse S2")]
    assert su[1].category == "deception"
    assert check_images(s + u) == 4


def test_resolve_train_subfolder_and_explicit(tmp_path):
    root = tmp_path / "vlg"
    _write(root, _records())
    (root / "train").mkdir()
    assert resolve_vlguard(root)[1] == (root / "train").resolve()
    assert resolve_vlguard(root, image_root=root)[1] == root.resolve()
    assert resolve_vlguard(root, train_json=root / "train.json")[0] == (root / "train.json").resolve()


def test_samples_roundtrip(tmp_path):
    xs = [Sample("a", "q", "r", "/x/a.png", "privacy"), Sample("b", "q2", "r2", "/x/b.png")]
    save_samples(tmp_path / "s.jsonl", xs)
    assert load_samples(tmp_path / "s.jsonl") == xs
    assert Sample.from_dict(xs[1].to_dict()) == xs[1]


# ---------------------------------------------------------------- errors

def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="ys-zong/VLGuard") as e:
        resolve_vlguard(tmp_path / "nope")
    assert "nope" in str(e.value) and "vlguard_root: null" in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="train.json"):
        resolve_vlguard(tmp_path / "empty")


def test_not_a_list(tmp_path):
    tj = tmp_path / "train.json"
    tj.write_text(json.dumps({"id": "x"}))
    with pytest.raises(DataError, match="list") as e:
        load_records(tj)
    assert str(tj) in str(e.value)


def test_missing_key(tmp_path):
    recs = _records()
    del recs[2]["image"]
    tj = _write(tmp_path, recs)
    with pytest.raises(DataError) as e:
        load_records(tj)
    msg = str(e.value)
    assert "'u2'" in msg and str(tj) in msg and "'image'" in msg


def test_missing_key_no_id_uses_index(tmp_path):
    recs = _records()
    del recs[1]["id"]
    tj = _write(tmp_path, recs)
    with pytest.raises(DataError, match=r"record #1.*'id'"):
        load_records(tj)


def test_unsafe_without_instruction(tmp_path):
    recs = _records()
    recs[0]["instr-resp"] = [{"question": "Harm Q1", "response": "Refuse 1"}]
    tj = _write(tmp_path, recs)
    with pytest.raises(DataError, match=r"'u1'.*'instruction'") as e:
        load_records(tj)
    assert str(tj) in str(e.value)


def test_empty_string_rejected(tmp_path):
    recs = _records()
    recs[0]["instr-resp"][0]["response"] = "  "
    with pytest.raises(DataError, match=r"'u1'.*'response'"):
        load_records(_write(tmp_path, recs))


def test_safe_without_unsafe_instruction(tmp_path):
    recs = _records()
    recs[3]["instr-resp"] = [recs[3]["instr-resp"][1]]
    tj = _write(tmp_path, recs)
    with pytest.raises(DataError, match=r"'s2'.*'unsafe_instruction'") as e:
        load_records(tj)
    assert str(tj) in str(e.value)


def test_missing_image(tmp_path):
    tj = _write(tmp_path, _records())
    missing = tmp_path / "safe" / "b.png"
    missing.unlink()
    with pytest.raises(DataError) as e:
        split_records(load_records(tj), tmp_path, source=tj)
    assert "'s1'" in str(e.value) and str(missing.resolve()) in str(e.value)


def test_unreadable_image(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png at all")
    with pytest.raises(DataError) as e:
        open_image(bad, "rec9")
    assert "'rec9'" in str(e.value) and str(bad) in str(e.value)
    with pytest.raises(DataError, match="'zz'"):
        check_images([Sample("zz", "q", "r", str(bad))])
    with pytest.raises(DataError, match="not found"):
        open_image(tmp_path / "none.png", "rec9")


def test_open_image_rgb_loaded(tmp_path):
    p = tmp_path / "g.png"
    Image.new("L", (5, 4), 100).save(p)
    im = open_image(p)
    assert im.mode == "RGB" and im.size == (5, 4)
    p.unlink()
    assert im.getpixel((0, 0)) == (100, 100, 100)


def test_empty_split(tmp_path):
    recs = [r for r in _records() if r["safe"]]
    tj = _write(tmp_path, recs)
    with pytest.raises(DataError, match="'safety'") as e:
        split_records(load_records(tj), tmp_path, source=tj)
    assert str(tj) in str(e.value)
