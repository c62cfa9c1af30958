"""Tests of hsr_lib.params: defaults, files, extends, overrides, validation, save/load, fingerprints."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from hsr_lib.params import PARAM_DOCS, REFERENCE_DEFAULTS, Params, ParamsError, describe, load_params

PARAMS_DIR = Path(__file__).resolve().parents[1] / "params"
PARAM_FILES = sorted(p for p in PARAMS_DIR.glob("**/*.yaml")
                     if "sweep" not in (yaml.safe_load(p.read_text()) or {}))  # sweep files: test_sweep.py


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def file_error(tmp_path: Path, text: str, *needles: str) -> str:
    """Load a params file that must fail; the message names the file and every needle."""
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ParamsError) as exc:
        load_params(path)
    msg = str(exc.value)
    assert str(path) in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def override_error(overrides, *needles: str) -> str:
    """Overrides that must fail; the message names the source 'override' and every needle."""
    with pytest.raises(ParamsError) as exc:
        load_params(overrides=overrides)
    msg = str(exc.value)
    assert "override" in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


# ---- defaults and fidelity -------------------------------------------------------------------

def test_paper_defaults():
    P = load_params()
    assert P.fidelity == "paper" and P.source is None
    assert P.ships.score == "subspace" and P.ships.gqa_slot_bug is False
    assert P.realign.region == "paper" and P.realign.base_mask == "actual"
    assert (P.pruning.method, P.pruning.sparsity, P.pruning.pattern) == ("wanda", 0.5, "unstructured")
    assert (P.realign.p, P.realign.q, P.realign.p_max, P.realign.top_h) == (0.5, 0.5, 0.7, 10)
    assert (P.data.n_ships, P.data.seed_ships, P.data.n_scores, P.data.seed_scores) == (128, 114514, 128, 0)
    assert P.ships.epsilon == 1e-5 and P.ships.parts == ["q", "k", "v"] and P.ships.batch_heads == "auto"
    assert P.eval.judges == ["vlguard"] and P.eval.data_roots == {} and P.eval.n_items is None


def test_reference_defaults_flip_four_keys():
    paper, ref = load_params().to_dict(), load_params(overrides=["fidelity=reference"]).to_dict()
    assert ref["ships"]["score"] == "hidden0_angle" and ref["ships"]["gqa_slot_bug"] is True
    assert ref["realign"]["region"] == "reference" and ref["realign"]["base_mask"] == "rederived"
    diff = {f"{s}.{k}" for s in paper if isinstance(paper[s], dict) for k in paper[s] if paper[s][k] != ref[s][k]}
    assert diff == set(REFERENCE_DEFAULTS)


def test_fidelity_from_file_and_explicit_value_wins(tmp_path):
    path = write(tmp_path, "r.yaml", "fidelity: reference\nships: {score: kl}\n")
    P = load_params(path)
    assert P.fidelity == "reference" and P.ships.score == "kl" and P.realign.region == "reference"
    # an override of fidelity selects the defaults, but the file's explicit value still wins
    P2 = load_params(path, ["fidelity=paper"])
    assert P2.fidelity == "paper" and P2.ships.score == "kl" and P2.realign.region == "paper"


def test_fidelity_read_from_base_file(tmp_path):
    write(tmp_path, "base.yaml", "fidelity: reference\n")
    P = load_params(write(tmp_path, "leaf.yaml", "extends: base.yaml\nrun_name: leaf\n"))
    assert P.fidelity == "reference" and P.ships.gqa_slot_bug is True


# ---- overrides --------------------------------------------------------------------------------

def test_overrides_as_strings():
    P = load_params(overrides=["pruning.sparsity=0.6", "ships.parts=[q, k]", "realign.save_model=true",
                               "eval.n_items=null", "ships.epsilon=1e-3", "pruning.pattern=2:4",
                               "pruning.sparsity=0.5", "run_name=2024", "ships.batch_heads=8"])
    assert P.ships.parts == ["q", "k"] and P.realign.save_model is True and P.eval.n_items is None
    assert P.ships.epsilon == 1e-3 and P.pruning.pattern == "2:4" and P.pruning.sparsity == 0.5
    assert P.run_name == "2024" and P.ships.batch_heads == 8


def test_overrides_as_dotted_and_nested_dict():
    P = load_params(overrides={"pruning.sparsity": 0.6, "eval": {"data_roots": {"mmbench": "/d/mmb"}}})
    assert P.pruning.sparsity == 0.6 and P.eval.data_roots == {"mmbench": "/d/mmb"}
    assert load_params(overrides={"realign.p": 0}).realign.p == 0.0  # int accepted for float


def test_override_beats_file(tmp_path):
    path = write(tmp_path, "a.yaml", "pruning: {sparsity: 0.4}\n")
    assert load_params(path).pruning.sparsity == 0.4
    assert load_params(path, {"pruning.sparsity": 0.6}).pruning.sparsity == 0.6


def test_override_without_equals():
    override_error(["pruning.sparsity"], "pruning.sparsity", "KEY=VALUE")


def test_override_type_error_string():
    override_error(["pruning.sequential=3"], "pruning.sequential", "boolean")


def test_override_type_error_dict():
    override_error({"realign.top_h": "ten"}, "realign.top_h", "integer")


def test_override_unknown_key():
    override_error({"pruning.sparsty": 0.6}, "pruning.sparsty", "did you mean 'pruning.sparsity'?")


# ---- validation rules (each names the key and the source) -------------------------------------

def test_unknown_key_in_file(tmp_path):
    file_error(tmp_path, "pruning:\n  sparsty: 0.6\n", "pruning.sparsty", "did you mean 'pruning.sparsity'?")


def test_unknown_top_level_key_suggests_section(tmp_path):
    file_error(tmp_path, "top_h: 4\n", "top_h", "did you mean 'realign.top_h'?")


def test_unknown_section(tmp_path):
    file_error(tmp_path, "prunning:\n  sparsity: 0.6\n", "unknown section 'prunning'", "'pruning'")


def test_section_not_a_mapping(tmp_path):
    file_error(tmp_path, "pruning: 0.5\n", "pruning", "mapping")


def test_bool_is_not_int(tmp_path):
    file_error(tmp_path, "realign:\n  top_h: true\n", "realign.top_h", "integer")


def test_str_is_not_list(tmp_path):
    file_error(tmp_path, "ships:\n  parts: q\n", "ships.parts", "list")


def test_str_is_not_float(tmp_path):
    file_error(tmp_path, "pruning:\n  sparsity: half\n", "pruning.sparsity", "number")


def test_int_accepted_for_float_and_exponent_floats(tmp_path):
    P = load_params(write(tmp_path, "ok.yaml", "ships: {epsilon: 1e-5}\npruning: {percdamp: 1}\n"))
    assert P.ships.epsilon == 1e-5 and P.pruning.percdamp == 1.0 and isinstance(P.pruning.percdamp, float)


@pytest.mark.parametrize("key, value, allowed", [
    ("pruning.sparsity", 1.0, "[0, 1)"), ("pruning.sparsity", -0.1, "[0, 1)"),
    ("ships.epsilon", 0, "> 0"), ("pruning.percdamp", 0, "> 0"),
    ("realign.q", 0, "(0, 1]"), ("realign.p", 1.5, "[0, 1]"), ("realign.p_max", -0.2, "[0, 1]"),
    ("realign.top_h", 0, ">= 1"), ("data.n_synthetic", 3, ">= 4"), ("data.n_ships", 0, ">= 1"),
    ("data.n_scores", 0, ">= 1"), ("ships.r_max", 0, ">= 1"), ("ships.batch_heads", 0, ">= 1"),
    ("scores.batch_size", 0, ">= 1"), ("pruning.blocksize", 0, ">= 1"), ("eval.max_new_tokens", 0, ">= 1"),
    ("eval.batch_size", 0, ">= 1"), ("eval.n_items", 0, ">= 1"),
])
def test_out_of_range(tmp_path, key, value, allowed):
    section, name = key.split(".")
    file_error(tmp_path, f"{section}:\n  {name}: {value}\n", key, allowed)
    override_error({key: value}, key, allowed)


@pytest.mark.parametrize("key, value, choice", [
    ("fidelity", "papr", "'reference'"), ("model.family", "llava", "'mllama'"),
    ("model.dtype", "fp16", "'bfloat16'"), ("model.attn_implementation", "flash", "'sdpa'"),
    ("ships.score", "angle", "'hidden0_angle'"), ("ships.dtype", "auto", "'float32'"),
    ("ships.batch_heads", "many", "'auto'"), ("pruning.method", "magnitude", "'sparsegpt'"),
    ("realign.variant", "hsr_b", "'random_heads'"), ("realign.region", "head", "'reference'"),
    ("realign.base_mask", "pruned", "'rederived'"),
])
def test_bad_choice(tmp_path, key, value, choice):
    override_error({key: value}, key, choice, repr(value))
    file_error(tmp_path, f"{key}: {value}\n", key, choice)


def test_bad_device():
    override_error(["model.device=gpu"], "model.device", "cuda:<int>")
    assert load_params(overrides=["model.device=cuda:1"]).model.device == "cuda:1"


@pytest.mark.parametrize("value, needle", [
    ("[q, x]", "'x'"), ("[qk]", "'qk'"), ("[q, q]", "repeat"), ("[]", "empty")])
def test_bad_parts(tmp_path, value, needle):
    file_error(tmp_path, f"ships:\n  parts: {value}\n", "ships.parts", needle)


def test_bad_judges(tmp_path):
    file_error(tmp_path, "eval:\n  judges: [vlguard, gpt4]\n", "eval.judges", "'gpt4'", "'wei'")


def test_llm_judge_needs_path(tmp_path):
    file_error(tmp_path, "eval:\n  judges: [llm]\n", "eval.llm_judge_path", "llm")
    assert load_params(overrides={"eval.judges": ["llm"], "eval.llm_judge_path": "/m"}).eval.judges == ["llm"]


@pytest.mark.parametrize("pattern", ["4:2", "0:4", "2:4:8", "a:b", "2-4", "dense"])
def test_malformed_nm(tmp_path, pattern):
    file_error(tmp_path, f"pruning:\n  pattern: '{pattern}'\n", "pruning.pattern", "N:M")


def test_nm_sparsity_mismatch(tmp_path):
    msg = file_error(tmp_path, "pruning:\n  pattern: 2:4\n  sparsity: 0.6\n", "pruning.pattern", "pruning.sparsity")
    assert "0.5" in msg and "0.6" in msg
    P = load_params(overrides=["pruning.pattern=1:4", "pruning.sparsity=0.25"])
    assert P.pruning.pattern == "1:4"


def test_p_above_p_max(tmp_path):
    file_error(tmp_path, "realign:\n  p: 0.8\n", "realign.p", "realign.p_max")
    override_error({"realign.p": 0.9, "realign.p_max": 0.8}, "realign.p", "realign.p_max")


def test_yaml_not_a_mapping(tmp_path):
    file_error(tmp_path, "- a\n- b\n", "mapping")


def test_yaml_syntax_error(tmp_path):
    file_error(tmp_path, "pruning: [unclosed\n", "YAML")


def test_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="nope.yaml"):
        load_params(tmp_path / "nope.yaml")


def test_extends_in_override_refused():
    override_error({"extends": "x.yaml"}, "extends")


# ---- extends ----------------------------------------------------------------------------------

def test_extends_chain(tmp_path):
    write(tmp_path, "a.yaml", "run_name: a\npruning: {sparsity: 0.4}\nrealign: {top_h: 3}\n")
    write(tmp_path, "sub/b.yaml", "extends: ../a.yaml\nrun_name: b\npruning: {method: snip}\n")
    c = write(tmp_path, "sub/c.yaml", "extends: b.yaml\nrun_name: c\nrealign: {top_h: 7}\n")
    P = load_params(c)
    assert (P.run_name, P.pruning.sparsity, P.pruning.method, P.realign.top_h) == ("c", 0.4, "snip", 7)
    assert P.source == str(c)


def test_extends_cycle(tmp_path):
    write(tmp_path, "a.yaml", "extends: b.yaml\n")
    write(tmp_path, "b.yaml", "extends: c.yaml\n")
    write(tmp_path, "c.yaml", "extends: a.yaml\n")
    with pytest.raises(ParamsError, match="cycle") as exc:
        load_params(tmp_path / "a.yaml")
    assert "extends" in str(exc.value) and "c.yaml" in str(exc.value)


def test_extends_self(tmp_path):
    file_error(tmp_path, "extends: bad.yaml\n", "extends", "cycle")


def test_extends_missing_file(tmp_path):
    file_error(tmp_path, "extends: base.yaml\n", "extends", "base.yaml", "not found")


def test_error_names_the_base_file(tmp_path):
    base = write(tmp_path, "base.yaml", "pruning: {sparsity: 2}\n")
    with pytest.raises(ParamsError) as exc:
        load_params(write(tmp_path, "leaf.yaml", "extends: base.yaml\n"))
    assert "pruning.sparsity" in str(exc.value) and str(base.name) in str(exc.value)


# ---- the Params object ------------------------------------------------------------------------

def test_access_and_immutability():
    P = load_params()
    assert P.get("pruning.sparsity") == P.pruning.sparsity == 0.5
    assert P.get("fidelity") == "paper" and P.get("pruning") is P.pruning
    with pytest.raises(dataclasses.FrozenInstanceError):
        P.pruning.sparsity = 0.6  # type: ignore[misc]
    with pytest.raises(ParamsError, match="pruning.sparsity"):
        P.get("pruning.sparsty")


def test_to_dict_is_plain_and_complete():
    d = load_params().to_dict()
    json.dumps(d)
    flat = {f"{s}.{k}" for s, v in d.items() if isinstance(v, dict) for k in v} | \
           {k for k, v in d.items() if not isinstance(v, dict)}
    assert flat == set(PARAM_DOCS) and "source" not in d


def test_save_load_round_trip(tmp_path):
    P = load_params(PARAMS_DIR / "tiny.yaml", ["pruning.pattern=2:4", "run_name=1e5", "fidelity=reference",
                                               "eval.data_roots={mmbench: /x}", "ships.epsilon=1e-7"])
    out = P.save(tmp_path / "run" / "params.yaml")
    Q = load_params(out)
    assert Q == P and Q.to_dict() == P.to_dict() and Q.source == str(out)
    assert yaml.safe_load(out.read_text())["pruning"]["pattern"] == "2:4"  # plain PyYAML reads it back too
    assert not list(out.parent.glob("*.tmp"))


def test_fingerprint_changes_only_with_named_section():
    a = load_params()
    b = load_params(overrides={"pruning.sparsity": 0.6})
    assert a.fingerprint("ships") == b.fingerprint("ships")
    assert a.fingerprint("pruning") != b.fingerprint("pruning")
    assert a.fingerprint("ships", "fidelity") == b.fingerprint("fidelity", "ships")
    c = load_params(overrides={"fidelity": "reference"})
    assert a.fingerprint("pruning") == c.fingerprint("pruning")
    assert a.fingerprint("fidelity") != c.fingerprint("fidelity")
    assert a.fingerprint("ships") != c.fingerprint("ships")
    assert a.fingerprint() != b.fingerprint() and a.fingerprint() == load_params().fingerprint()


def test_describe_documents_every_key():
    rows = describe(load_params())
    assert [r["key"] for r in rows] == list(PARAM_DOCS)
    assert all(r["doc"] and r["type"] for r in rows)
    row = {r["key"]: r for r in rows}["ships.score"]
    assert (row["default"], row["reference_default"], row["value"]) == ("subspace", "hidden0_angle", "subspace")


def test_params_default_construct_matches_paper_defaults():
    assert Params() == load_params()


# ---- the shipped params files -----------------------------------------------------------------

def test_params_glob_finds_files():
    assert len(PARAM_FILES) >= 9, PARAM_FILES


@pytest.mark.parametrize("path", PARAM_FILES, ids=lambda p: str(p.relative_to(PARAMS_DIR)))
def test_every_params_file_loads(path):
    P = load_params(path)
    assert P.source == str(path)
    if not path.name.startswith("_"):
        assert P.run_name == path.stem


def test_paper_and_reference_settings():
    tiny = load_params(PARAMS_DIR / "tiny.yaml")
    assert tiny.model.name == "tiny:qwen2_5_vl" and tiny.realign.top_h == 4 and tiny.eval.max_new_tokens == 16
    qwen = load_params(PARAMS_DIR / "qwen2_5_vl_7b.yaml")
    root = PARAMS_DIR.parent  # paths in a params file are relative to its folder: ../VLGuard is the project's
    assert qwen.model.name == "Qwen/Qwen2.5-VL-7B-Instruct" and qwen.data.vlguard_root == str(root / "VLGuard")
    assert qwen.runs_dir == str(root / "runs") and qwen.eval.data_roots["mmbench"] == str(root / "eval_data" / "mmbench")
    assert qwen.data.image_root is None  # <vlguard_root>/train when it exists
    assert (qwen.model.dtype, qwen.eval.max_new_tokens, qwen.data.n_ships, qwen.realign.top_h) == \
        ("bfloat16", 128, 128, 10)
    ref = load_params(PARAMS_DIR / "reference_llava_next_llama3_8b.yaml")
    assert ref.fidelity == "reference" and ref.realign.top_h == 4 and ref.ships.score == "hidden0_angle"
    sweep = load_params(PARAMS_DIR / "sweeps" / "tiny_sparsity_0.6.yaml")
    assert sweep.pruning.sparsity == 0.6 and sweep.model.name == "tiny:qwen2_5_vl"
