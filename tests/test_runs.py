"""The run directory and the step graph: keyed folders, staging, markers, what each step's key
depends on (and what it must not), the data step."""

import json
import os
from pathlib import Path

import pytest

from hsr_lib import steps
from hsr_lib.data import load_records, sample_indices, split_records
from hsr_lib.io import atomic_write_json, read_json
from hsr_lib.params import load_params, resolve_paths
from hsr_lib.runs import Run, Spec

TINY = Path(__file__).resolve().parent.parent / "params" / "tiny.yaml"


def make_run(tmp_path, *overrides, name="r"):
    P = load_params(TINY, [f"runs_dir={tmp_path}", f"run_name={name}", *overrides])
    return Run.open(P)


def P(*overrides):
    return load_params(TINY, list(overrides))


def test_params_and_manifest_are_written_only_when_a_step_ran(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Pr = load_params(None, ["runs_dir=out", "data.vlguard_root=vg"])
    run = Run.open(Pr)
    assert run.dir == tmp_path / "out" / Pr.run_name and sorted(run.dir.iterdir()) == []
    s = Spec("data", "d", {"n": 1})
    with run.step(s):
        pass
    saved = load_params(run.params_path)
    assert saved.runs_dir == str(tmp_path / "out") and saved.data.vlguard_root == str(tmp_path / "vg")
    m = read_json(run.dir / "manifest.json")
    assert m["versions"]["torch"] and m["versions"]["transformers"] and m["device"]
    assert m["fidelity"] == "paper" and list(m["steps"]) == [s.where]
    with pytest.raises(RuntimeError):  # a failing step changes neither
        with run.using(Pr.replace({"pruning.sparsity": 0.3})).step(Spec("prune", "p", {})):
            raise RuntimeError("boom")
    assert load_params(run.params_path).pruning.sparsity == 0.5 and list(read_json(run.dir / "manifest.json")["steps"]) == [s.where]


def test_resolve_paths_keeps_hub_ids_and_tiny_names(tmp_path):
    for name in ("tiny:mllama", "Qwen/Qwen2-VL-7B-Instruct"):
        assert resolve_paths(load_params(None, [f"model.name={name}"]), tmp_path).model.name == name
    (tmp_path / "ckpt").mkdir()
    assert resolve_paths(load_params(None, ["model.name=ckpt"]), tmp_path).model.name == str(tmp_path / "ckpt")


def test_spec_key_is_label_and_hash_of_reads_and_upstream():
    a = Spec("prune", "wanda-0.5", {"x": 1})
    assert a.key == f"wanda-0.5-{a.fingerprint[:10]}" and a.where == f"prune/{a.key}"
    assert Spec("prune", "wanda-0.5", {"x": 1}).fingerprint == a.fingerprint
    assert Spec("prune", "wanda-0.5", {"x": 2}).fingerprint != a.fingerprint
    up1, up2 = Spec("data", "d", {"n": 1}), Spec("data", "d", {"n": 2})
    assert Spec("ships", "s", {}, upstream=(up1,)).key != Spec("ships", "s", {}, upstream=(up2,)).key
    assert Spec("ships", "s", {}, needs=(up1,)).key == Spec("ships", "s", {}, needs=(up2,)).key
    with pytest.raises(KeyError, match="nope"):
        Spec("nope", "x", {})


def test_step_works_in_staging_then_moves_to_its_key(tmp_path):
    run = make_run(tmp_path)
    s = Spec("data", "d", {"n": 1})
    assert not run.is_done(s)
    with run.step(s) as d:
        assert d == run.staging(s) and d.name.startswith(".") and not run.path(s).exists()
        (d / "a.txt").write_text("x")
    assert run.is_done(s) and (run.path(s) / "a.txt").read_text() == "x" and not run.staging(s).exists()
    rec = read_json(run.path(s) / "_step.json")
    assert rec["fingerprint"] == s.fingerprint and rec["reads"] == {"n": 1}
    assert read_json(run.dir / "manifest.json")["steps"][s.where]["fingerprint"] == s.fingerprint
    assert run.keys("data") == [s.key]


def test_crash_leaves_the_partial_folder_and_no_key(tmp_path):
    run = make_run(tmp_path)
    s = Spec("data", "d", {"n": 1})
    with pytest.raises(RuntimeError):
        with run.step(s) as d:
            (d / "progress.json").write_text("{}")
            raise RuntimeError("killed")
    assert not run.is_done(s) and not run.path(s).exists()
    assert (run.staging(s) / "progress.json").exists()  # what a resumed attempt starts from


def test_two_settings_coexist(tmp_path):
    run = make_run(tmp_path)
    a, b = Spec("prune", "x", {"s": 0.5}), Spec("prune", "x", {"s": 0.6})
    for s in (a, b):
        with run.step(s):
            pass
    assert run.is_done(a) and run.is_done(b) and len(run.keys("prune")) == 2


# ------------------------------------------------------------------ the step graph


def test_ships_key_ignores_what_it_does_not_read():
    base = steps.ships.spec(P()).key
    for o in ("data.n_scores=5", "data.seed_scores=3", "ships.score=kl", "ships.batch_heads=2", "realign.top_h=2",
              "model.device=cuda", "pruning.sparsity=0.6", "scores.methods=[wanda]", "eval.max_new_tokens=3"):
        assert steps.ships.spec(P(o)).key == base, o
    for o in ("data.n_ships=5", "ships.epsilon=0.001", "ships.dtype=bfloat16", "model.name=tiny:qwen2_vl",
              "ships.parts=[q,k]", "fidelity=reference"):
        assert steps.ships.spec(P(o)).key != base, o


def test_scores_prune_and_realign_keys():
    base = P()
    # pruning reads no score file: scoring another method never re-prunes
    assert steps.prune.spec(P("scores.methods=[snip]")).key == steps.prune.spec(base).key
    assert steps.prune.spec(P("model.device=cuda")).key == steps.prune.spec(base).key
    assert steps.prune.spec(P("model.dtype=bfloat16")).key != steps.prune.spec(base).key
    assert steps.prune.spec(P("pruning.sparsity=0.6")).key.startswith("wanda-0.6-unstructured-")
    assert steps.prune.spec(P("pruning.method=sparsegpt", "pruning.pattern=2:4")).key.startswith("sparsegpt-0.5-2of4-")
    # the blocksize only matters to SparseGPT
    assert steps.prune.spec(P("pruning.blocksize=64")).key == steps.prune.spec(base).key
    assert steps.scores.spec(base, "snip").key.startswith("snip-")
    assert steps.scores.spec(P("data.n_ships=3"), "wanda").key == steps.scores.spec(base, "wanda").key
    # a realignment's key covers the pruning, scores and Ships it sits on
    r = steps.realign.spec(base)
    assert r.key.startswith("hsr-p0.5-q0.5-pmax0.7-h4-")
    for o in ("pruning.sparsity=0.6", "ships.epsilon=0.001", "data.n_scores=5", "ships.score=kl", "realign.q=0.3"):
        assert steps.realign.spec(P(o)).key != r.key, o
    assert steps.realign.spec(P("realign.seed=3")).key == r.key  # the seed only matters to random heads
    rh = steps.realign.spec(P("realign.variant=random_heads", "realign.seed=3"))
    assert rh.key.startswith("random_heads-p0.5-q0.5-pmax0.7-h4-s3-") and "ships" not in {u.step for u in rh.upstream}
    assert steps.realign.spec(P("realign.variant=random_heads", "realign.seed=3", "ships.epsilon=0.1")).key == rh.key


def test_evaluate_key_follows_its_variants():
    base = steps.evaluate.spec(P())
    assert steps.evaluate.spec(P("realign.q=0.3")).key != base.key  # the hsr variant changed
    assert steps.evaluate.spec(P("scores.methods=[wanda]")).key == base.key
    keys = {u.key for u in base.upstream}
    assert any(k.startswith("hsr_a-") for k in keys) and any(k.startswith("random_heads-") for k in keys)


# ------------------------------------------------------------------ the data step


def test_data_step_synthetic_matches_formula_and_caches(tmp_path):
    run = make_run(tmp_path)
    sets = steps.data.run(run)
    root = steps.data.synthetic_dir(run.dir, run.params)
    splits = split_records(load_records(root / "train.json"), root)
    Pr = run.params
    want = [splits["safety"][i].id for i in sample_indices(len(splits["safety"]), Pr.data.n_ships, Pr.data.seed_ships)]
    assert [s.id for s in sets.load("ships_safety")] == want
    want_u = [splits["utility"][i].id for i in sample_indices(len(splits["utility"]), Pr.data.n_scores, 0)]
    assert [s.id for s in sets.load("scores_utility")] == want_u
    assert sets.summary["splits"] == {k: len(v) for k, v in splits.items()}
    marker = (sets.dir / "_step.json").read_text()
    assert steps.data.run(make_run(tmp_path)).dir == sets.dir  # unchanged params: nothing recomputed
    assert (sets.dir / "_step.json").read_text() == marker
    again = steps.data.run(make_run(tmp_path, "data.n_ships=5"))
    assert len(again.load("ships_safety")) == 5 and again.dir != sets.dir and sets.dir.is_dir()


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


def test_data_step_real_root_fingerprints_train_json(tmp_path):
    vg = tmp_path / "vg"
    _tiny_vlguard(vg)
    run = make_run(tmp_path, f"data.vlguard_root={vg}", "data.n_ships=all", "data.n_scores=all")
    sets = steps.data.run(run)
    assert sets.dir.name.startswith("vlguard-")
    assert [s.question for s in sets.load("safety")] == ["bad 1", "bad 3"]
    assert [s.question for s in sets.load("utility")] == ["ok 0", "ok 2"]
    assert sets.summary["source"] == str(vg / "train.json")
    ships_before = steps.ships.spec(run.params).key
    recs = json.loads((vg / "train.json").read_text())
    recs[1]["instr-resp"][0]["instruction"] = "changed"
    (vg / "train.json").write_text(json.dumps(recs))
    run2 = make_run(tmp_path, f"data.vlguard_root={vg}", "data.n_ships=all", "data.n_scores=all")
    assert steps.data.run(run2).load("safety")[0].question == "changed"
    assert steps.ships.spec(run2.params).key != ships_before  # new content, new downstream keys


def test_load_of_a_step_that_has_not_run_names_it(tmp_path):
    run = make_run(tmp_path)
    with pytest.raises(steps.StepNotDone, match="prune"):
        steps.prune.load(run)


def test_atomic_write_keeps_old_content_on_failure(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_json(path, {"x": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"x": object()})
    assert read_json(path) == {"x": 1}
    assert os.listdir(tmp_path) == ["a.json"]  # no temporary file left behind


def test_the_run_options_travel_as_parameters_into_start(tmp_path, monkeypatch):
    """`hsr run` hands its options to each notebook as papermill parameters (``run_options``), and
    ``notebook.start`` takes the same options as keyword arguments."""
    from hsr_lib import progress
    from hsr_lib.cli import kernel_parameters
    from hsr_lib.notebook import start

    monkeypatch.chdir(tmp_path)
    run = Run.open(P(f"runs_dir={tmp_path}"), verify=True, force=("prune",), token="tok-1")
    params = kernel_parameters(run)
    assert params["run_options"] == {"verify": True, "force": ["prune"], "token": "tok-1", "text_progress": True}
    try:
        again = start(None, params["overrides"], **params["run_options"])
        assert (again.verify, again.force, again.token, again.dir) == (True, ("prune",), "tok-1", run.dir)
        assert progress.progress(range(1)).__class__.__module__ == "tqdm.std"
    finally:
        progress.use_text(False)
    fresh = start(None, params["overrides"])
    assert (fresh.verify, fresh.force) == (False, ()) and fresh.token != "tok-1"
    with pytest.raises(ValueError, match="'prnue' is not a step"):
        Run.open(P(f"runs_dir={tmp_path}"), force=("prnue",))
