"""Tests for hsr_lib.synthetic: schema, variety, determinism."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from hsr_lib.data import DataError, check_images, load_records, split_records
from hsr_lib.synthetic import CATEGORIES, make_synthetic_vlguard

FOUR = {"privacy", "risky behavior", "deception", "discrimination"}


def test_schema_and_variety(tmp_path):
    t0 = time.perf_counter()
    tj = make_synthetic_vlguard(tmp_path / "syn", n_records=48, seed=0)
    assert time.perf_counter() - t0 < 2.0
    assert tj == tmp_path / "syn" / "train.json"
    recs = load_records(tj)
    assert len(recs) == 48
    assert all(r["id"].startswith("synth_") for r in recs)
    n_unsafe = sum(not r["safe"] for r in recs)
    assert n_unsafe == 24
    cats = {r["harmful_category"] for r in recs if not r["safe"]}
    assert cats == FOUR == set(CATEGORIES)
    for r in recs:
        if not r["safe"]:
            assert r["harmful_subcategory"] in CATEGORIES[r["harmful_category"]]["subcategories"]
        assert r["image"].startswith("images/") and r["image"].endswith(".png")
    splits = split_records(recs, tmp_path / "syn", source=tj)
    assert {k: len(v) for k, v in splits.items()} == {"safety": 24, "utility": 24, "safe_unsafe": 24}
    assert check_images(splits["safety"] + splits["utility"]) == 48
    sizes = {Image.open(s.image).size for s in splits["utility"] + splits["safety"]}
    assert len(sizes) >= 3
    assert any(w != h for w, h in sizes)
    assert all(48 <= w <= 192 and 48 <= h <= 192 for w, h in sizes)
    # helpful answers mention the image content
    assert all("background" in s.response for s in splits["utility"])
    assert len({s.response for s in splits["utility"]}) > 10
    assert len({s.response for s in splits["safety"]}) > 1


def test_deterministic(tmp_path):
    a = make_synthetic_vlguard(tmp_path / "a", n_records=12, seed=3)
    b = make_synthetic_vlguard(tmp_path / "b", n_records=12, seed=3)
    assert a.read_bytes() == b.read_bytes()
    for r in load_records(a):
        pa = np.asarray(Image.open(tmp_path / "a" / r["image"]))
        pb = np.asarray(Image.open(tmp_path / "b" / r["image"]))
        np.testing.assert_array_equal(pa, pb)
    # idempotent in place
    before = a.read_bytes()
    make_synthetic_vlguard(tmp_path / "a", n_records=12, seed=3)
    assert a.read_bytes() == before
    c = make_synthetic_vlguard(tmp_path / "c", n_records=12, seed=4)
    assert c.read_bytes() != a.read_bytes()


def test_smallest(tmp_path):
    tj = make_synthetic_vlguard(tmp_path, n_records=4, seed=1)
    splits = split_records(load_records(tj), tmp_path, source=tj)
    assert all(len(v) >= 1 for v in splits.values())
    assert {s.category for s in splits["safety"]} <= FOUR


@pytest.mark.parametrize("bad", [3, 0, -1])
def test_bad_n_records(tmp_path, bad):
    with pytest.raises(DataError, match=str(bad)):
        make_synthetic_vlguard(tmp_path, n_records=bad)
