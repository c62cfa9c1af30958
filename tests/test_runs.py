"""The run directory: resolved params, manifest, step caching and invalidation, atomic writes."""

import json
import os
from pathlib import Path

import pytest

from hsr_lib.data import load_records, sample_indices, split_records
from hsr_lib.datastep import prepare_data
from hsr_lib.io import atomic_write_json, read_json
from hsr_lib.params import load_params
from hsr_lib.runs import Run, resolve_paths

TINY = Path(__file__).resolve().parent.parent / "params" / "tiny.yaml"


def make_run(tmp_path, *overrides, name="r"):
    P = load_params(TINY, [f"runs_dir={tmp_path}", f"run_name={name}", *overrides])
    return Run.open(P)


def test_open_writes_resolved_params_and_manifest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    P = load_params(None, ["runs_dir=out", "data.vlguard_root=vg"])
    run = Run.open(P)
    assert run.dir == tmp_path / "out" / P.run_name
    saved = load_params(run.params_path)
    assert saved.runs_dir == str(tmp_path / "out") and saved.data.vlguard_root == str(tmp_path / "vg")
    m = read_json(run.dir / "manifest.json")
    assert m["versions"]["torch"] and m["versions"]["transformers"] and m["device"]
    assert m["fidelity"] == "paper" and m["steps"] == {}


def test_resolve_paths_keeps_hub_ids_and_tiny_names(tmp_path):
    for name in ("tiny:mllama", "Qwen/Qwen2-VL-7B-Instruct"):
        assert resolve_paths(load_params(None, [f"model.name={name}"]), tmp_path).model.name == name
    (tmp_path / "ckpt").mkdir()
    assert resolve_paths(load_params(None, ["model.name=ckpt"]), tmp_path).model.name == str(tmp_path / "ckpt")


def test_step_marker_and_invalidation(tmp_path):
    run = make_run(tmp_path)
    assert not run.is_done("data")
    with run.step("data"):
        pass
    with run.step("ships"):
        pass
    assert run.is_done("data") and run.is_done("ships")
    assert set(read_json(run.dir / "manifest.json")["steps"]) == {"data", "ships"}
    # a ships param leaves data valid; a data param invalidates data and, through it, ships
    r2 = make_run(tmp_path, "ships.epsilon=0.001")
    assert r2.is_done("data") and not r2.is_done("ships")
    r3 = make_run(tmp_path, "data.n_ships=3")
    assert not r3.is_done("data")
    with r3.step("data"):
        pass
    assert not r3.is_done("ships")  # its upstream fingerprint changed


def test_crash_leaves_step_not_done(tmp_path):
    run = make_run(tmp_path)
    with run.step("data"):
        pass
    with pytest.raises(RuntimeError):
        with run.step("data"):
            raise RuntimeError("killed")
    assert not run.is_done("data")


def test_unknown_step(tmp_path):
    with pytest.raises(KeyError, match="nope"):
        make_run(tmp_path).step_dir("nope")


def test_prepare_data_synthetic_matches_formula_and_caches(tmp_path):
    run = make_run(tmp_path)
    sets = prepare_data(run)
    root = run.step_dir("data") / "synthetic_vlguard"
    splits = split_records(load_records(root / "train.json"), root)
    P = run.params
    want = [splits["safety"][i].id for i in sample_indices(len(splits["safety"]), P.data.n_ships, P.data.seed_ships)]
    assert [s.id for s in sets.load("ships_safety")] == want
    want_u = [splits["utility"][i].id for i in sample_indices(len(splits["utility"]), P.data.n_scores, 0)]
    assert [s.id for s in sets.load("scores_utility")] == want_u
    assert sets.summary["splits"] == {k: len(v) for k, v in splits.items()}
    marker = (run.step_dir("data") / "_step.json").read_text()
    prepare_data(make_run(tmp_path))  # unchanged params: nothing recomputed
    assert (run.step_dir("data") / "_step.json").read_text() == marker
    again = prepare_data(make_run(tmp_path, "data.n_ships=5"))
    assert len(again.load("ships_safety")) == 5


def _tiny_vlguard(root):
    from PIL import Image

    (root / "img").mkdir(parents=True)
    recs = []
    for i in range(4):
        Image.new("RGB", (8 + i, 9), (i * 40, 0, 0)).save(root / "img" / f"{i}.png")
        if i % 2:
            recs.append({"id": f"u{i}", "image": f"img/{i}.png", "safe": False, "harmful_category": "privacy",
                         "instr-resp": [{"instruction": f"bad {i}", "response": "No."}]})
        else:
            recs.append({"id": f"s{i}", "image": f"img/{i}.png", "safe": True,
                         "instr-resp": [{"safe_instruction": f"ok {i}", "response": "Sure."},
                                        {"unsafe_instruction": f"bad {i}", "response": "No."}]})
    (root / "train.json").write_text(json.dumps(recs))


def test_prepare_data_real_root_fingerprints_train_json(tmp_path):
    vg = tmp_path / "vg"
    _tiny_vlguard(vg)
    run = make_run(tmp_path, f"data.vlguard_root={vg}")
    sets = prepare_data(run)
    assert [s.question for s in sets.load("safety")] == ["bad 1", "bad 3"]
    assert [s.question for s in sets.load("utility")] == ["ok 0", "ok 2"]
    assert sets.summary["source"] == str(vg / "train.json")
    assert run.is_done("data", {"train_json": __import__("hsr_lib.io").io.file_hash(vg / "train.json"),
                                "image_root": str(vg)})
    recs = json.loads((vg / "train.json").read_text())
    recs[1]["instr-resp"][0]["instruction"] = "changed"
    (vg / "train.json").write_text(json.dumps(recs))
    assert prepare_data(make_run(tmp_path, f"data.vlguard_root={vg}")).load("safety")[0].question == "changed"


def test_atomic_write_keeps_old_content_on_failure(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_json(path, {"x": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"x": object()})
    assert read_json(path) == {"x": 1}
    assert os.listdir(tmp_path) == ["a.json"]  # no temporary file left behind
