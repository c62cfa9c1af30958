"""What identifies an input (docs/run-directory.md): a model and an image by content, never by
location. Replaced weights or images give new keys (and a new computation beside the old one,
which stays untouched); a moved or copied model folder, data folder or run directory keeps them;
a step reused under other package versions says so in one line."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from conftest import TINY, only
from test_trust import markers, snapshot
from hsr_lib import identity, io, steps, toy_model
from hsr_lib.cli import main
from hsr_lib.evaluate.benchmarks import data_fingerprint
from hsr_lib.params import load_params
from hsr_lib.runs import Run


@pytest.fixture
def hash_cache(tmp_path, monkeypatch):
    """A private ``$HSR_CACHE`` and an empty in-process hash cache."""
    monkeypatch.setenv("HSR_CACHE", str(tmp_path / "cache"))
    io._hash_of.cache_clear()
    yield tmp_path / "cache" / "hashes"
    io._hash_of.cache_clear()


def _replace_keeping_times(path: Path, data: bytes) -> None:
    """Overwrite ``path`` in place with same-size content and its old modification time (as
    ``cp -p`` or ``rsync -a`` would leave it)."""
    st = path.stat()
    time.sleep(0.05)  # another change time than the first write (kernel timestamps are coarse)
    assert len(data) == st.st_size
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _other_weights(path: Path) -> bytes:
    """The same safetensors file with one tensor changed (same size)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    name = next(k for k in sorted(tensors) if tensors[k].dim() == 2)
    tensors[name] = tensors[name] * -1.0
    tmp = path.with_name("other.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    data = tmp.read_bytes()
    tmp.unlink()
    return data


def test_file_hashes_are_cached_on_disk_and_a_replaced_file_is_rehashed(hash_cache, tmp_path, monkeypatch):
    f = tmp_path / "big.bin"
    f.write_bytes(b"a" * io.HASH_CACHE_MIN)
    first = identity.file_hash(f)
    entries = list(hash_cache.glob("*/*.json"))
    assert len(entries) == 1 and json.loads(entries[0].read_text())["hash"] == first
    io._hash_of.cache_clear()  # as another process would: the disk entry answers, nothing is read
    monkeypatch.setattr(io, "file_hash", lambda p: pytest.fail(f"re-hashed {p}"))
    assert identity.file_hash(f) == first
    monkeypatch.undo()
    monkeypatch.setenv("HSR_CACHE", str(tmp_path / "cache"))
    _replace_keeping_times(f, b"b" * io.HASH_CACHE_MIN)
    assert identity.file_hash(f) != first  # same path, size and mtime: the change time tells
    assert not list(hash_cache.glob("*/.*.tmp"))  # written atomically, nothing left behind


def test_tiny_and_toy_models_are_identified_by_build_and_bytes(hash_cache):
    fp = identity.model_fingerprint
    assert fp("tiny:qwen2_vl", 0) == fp("tiny:qwen2_vl", 0) != fp("tiny:qwen2_vl", 1) != fp("tiny:llava_next", 1)
    assert fp("toy:qwen2_vl") == identity.folder_fingerprint(toy_model.SHIPPED)
    names = {p.name for p in identity.model_files(toy_model.SHIPPED)}
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"} <= names
    assert "toy_card.json" not in names  # the card is documentation (it carries the training time)


def test_the_toy_cache_is_keyed_by_the_whole_recipe(hash_cache):
    r = toy_model.Recipe(seed=5)
    path = toy_model.cache_path(r)
    assert path.parent == toy_model.cache_dir() and path.name.startswith("qwen2_vl-s5-")
    for change in ({"steps": r.steps + 1}, {"lr": r.lr / 2}, {"n_harmful": r.n_harmful + 1}):
        assert toy_model.cache_path(dataclasses.replace(r, **change)) != path, change
    assert toy_model.cache_path(toy_model.Recipe(seed=5)) == path
    with pytest.raises(FileNotFoundError, match=path.name):
        toy_model.checkpoint("toy:qwen2_vl-s5", train_missing=False)


def test_an_hf_id_is_its_cached_revision_and_an_unresolvable_one_is_refused(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--org--vlm"
    for commit in ("c0ffee", "decade"):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c0ffee")
    assert identity.model_fingerprint("org/vlm") == "hf:c0ffee"
    key = steps.prune.spec(load_params(TINY, {"model.name": "org/vlm"})).key
    (repo / "refs" / "main").write_text("decade")  # a newer download of the same id
    assert identity.model_fingerprint("org/vlm") == "hf:decade"
    assert steps.prune.spec(load_params(TINY, {"model.name": "org/vlm"})).key != key
    code = main(["run", str(TINY), "-p", f"runs_dir={tmp_path / 'runs'}", "-p", "model.name=org/elsewhere"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "'org/elsewhere': not in the local Hugging Face cache, so its revision cannot be known" in err
    assert not (tmp_path / "runs").exists()


def test_a_model_folder_by_content_replaced_weights_recompute_moved_or_copied_keep_keys(hash_cache, tmp_path):
    from hsr_lib.models import load_model

    folder = load_model("tiny:qwen2_vl", dtype="float32", device="cpu").save(tmp_path / "m")

    def run_for(model: Path, runs: Path = tmp_path / "runs") -> Run:
        return Run.open(load_params(TINY, {"runs_dir": str(runs), "run_name": "r", "model.name": str(model),
                                           "data.n_synthetic": 8, "data.n_ships": 2, "data.n_scores": 2}))

    run = run_for(folder)
    first = steps.ships.run(run, progress=False)
    before, prune_key = snapshot(first.dir), steps.prune.spec(run.params).key
    assert steps.ships.run(run_for(folder), progress=False).dir == first.dir  # unchanged: reused
    assert snapshot(first.dir) == before

    weights = folder / "model.safetensors"
    _replace_keeping_times(weights, _other_weights(weights))  # replaced in place, same size and mtime
    second = steps.ships.run(run_for(folder), progress=False)
    assert second.dir != first.dir and steps.prune.spec(run.params).key != prune_key  # every key that reads it
    assert second.all != first.all  # other weights, other head scores
    assert snapshot(first.dir) == before  # the finished folder of the old weights is left as it was

    copy = shutil.copytree(folder, tmp_path / "copy of m")
    moved = tmp_path / "elsewhere" / "m"
    moved.parent.mkdir()
    folder.rename(moved)
    runs_moved = shutil.copytree(tmp_path / "runs", tmp_path / "runs moved")  # a copied run directory too
    done = markers(runs_moved / "r")
    for model, runs in ((copy, tmp_path / "runs"), (moved, tmp_path / "runs"), (moved, runs_moved)):
        again = run_for(model, runs)
        assert steps.ships.spec(again.params).key == second.key and again.is_done(steps.ships.spec(again.params))
        assert steps.ships.run(again, progress=False).dir == again.dir / "ships" / second.key
    assert markers(runs_moved / "r") == done and snapshot(first.dir) == before


def _vlguard(tmp_path: Path) -> Path:
    from test_runs import _tiny_vlguard

    vg = tmp_path / "vg"
    _tiny_vlguard(vg)
    return vg


def test_replaced_vlguard_images_give_new_data_and_ships_keys(tmp_path):
    from PIL import Image

    vg = _vlguard(tmp_path)

    def run_for(root: Path) -> Run:
        return Run.open(load_params(TINY, {"runs_dir": str(tmp_path / "runs"), "data.vlguard_root": str(root),
                                           "data.n_ships": "all", "data.n_scores": "all"}))

    def keys(run: Run) -> dict[str, str]:
        return {m.NAME: m.spec(run.params).key for m in (steps.data, steps.ships, steps.scores)}

    run = run_for(vg)
    first = steps.data.run(run, progress=False)
    before, k0 = snapshot(first.dir), keys(run)
    Image.new("RGB", (9, 9), (0, 200, 0)).save(vg / "img" / "0.png")  # a safe record: the utility sample
    k1 = keys(run_for(vg))
    assert k1["data"] != k0["data"] and k1["scores"] != k0["scores"] and k1["ships"] == k0["ships"]
    Image.new("RGB", (9, 9), (0, 0, 200)).save(vg / "img" / "1.png")  # an unsafe record: Ships' prompts
    k2 = keys(run_for(vg))
    assert k2["data"] != k1["data"] and k2["ships"] != k1["ships"] and k2["scores"] != k1["scores"]
    again = steps.data.run(run_for(vg), progress=False)
    assert again.dir != first.dir and snapshot(first.dir) == before  # the old sets are left as they were
    moved = shutil.move(str(vg), str(tmp_path / "moved vg"))
    assert keys(run_for(Path(moved))) == k2  # a moved download keeps its keys


def test_replaced_benchmark_images_give_a_new_benchmark_fingerprint(run_copy, tmp_path):
    from PIL import Image

    from conftest import ROOT

    run = run_copy()
    done = steps.evaluate.spec(run.params)
    before = snapshot(run.dir / "evaluate")
    bench = shutil.copytree(ROOT / "tests" / "fixtures" / "eval" / "vlguard", tmp_path / "vlguard")
    roots = {**run.params.eval.data_roots, "vlguard": str(bench)}
    fp = data_fingerprint("vlguard_unsafe", roots)
    assert fp == data_fingerprint("vlguard_unsafe", run.params.eval.data_roots)  # copied: the same content
    Image.new("RGB", (12, 12), (250, 0, 250)).save(bench / "test" / "bad_ads" / "unsafe_0.png")  # same test.json
    assert data_fingerprint("vlguard_unsafe", roots) != fp
    changed = run.using(run.params.replace({"eval.data_roots": roots}))
    assert steps.evaluate.spec(changed.params).key != done.key and not changed.is_done(steps.evaluate.spec(changed.params))
    assert run.is_done(done) and snapshot(run.dir / "evaluate") == before  # the finished evaluation is untouched


def test_step_records_versions_and_a_reuse_under_other_versions_is_one_line(run_copy, capsys):
    from hsr_lib.runs import versions

    run = run_copy()
    folder = only(run.dir / "prune")
    marker = folder / "_step.json"
    rec = json.loads(marker.read_text())
    assert {"hsr", "torch", "transformers"} <= set(rec["versions"]) and "git_commit" in rec
    assert rec["versions"]["torch"] == versions()["torch"]
    rec["versions"] = {**rec["versions"], "torch": "0.0.1", "transformers": "0.0.2"}
    marker.write_text(json.dumps(rec))
    before = snapshot(run.dir)
    res = steps.prune.run(run, progress=False)
    out = [ln for ln in capsys.readouterr().out.splitlines() if "computed under" in ln]
    assert res.dir == folder and snapshot(run.dir) == before  # reused, not recomputed, nothing rewritten
    assert out == [f"[hsr] prune/{folder.name}: computed under torch 0.0.1, transformers 0.0.2 (now torch "
                   f"{versions()['torch']}, transformers {versions()['transformers']}); reused as it is "
                   "(--force prune recomputes it)"]
