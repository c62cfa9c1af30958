"""Shared fixtures: offline mode, tiny models built once per session, a small synthetic VLGuard."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
from PIL import Image  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    """``tiny(name)`` → ``(model, processor)``, built once per session per name (seed 0).

    Tests must not modify the returned model or processor; build a fresh one when they need to.
    """
    from hsr_lib.tiny import build_tiny

    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = build_tiny(name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def two_images():
    """Two different RGB images of the same non-square size."""
    a = Image.new("RGB", (40, 56), (200, 30, 30))
    b = Image.new("RGB", (40, 56), (30, 30, 200))
    for x in range(0, 40, 4):
        for y in range(0, 56, 8):
            b.putpixel((x, y), (250, 250, 250))
    return a, b


@pytest.fixture(scope="session")
def synthetic_vlguard(tmp_path_factory):
    """A synthetic VLGuard set of 8 records: ``(train_json, image_root, splits)``."""
    from hsr_lib.data import load_records, split_records
    from hsr_lib.synthetic import make_synthetic_vlguard

    root = tmp_path_factory.mktemp("vlguard8")
    tj = make_synthetic_vlguard(root, n_records=8, seed=0)
    splits = split_records(load_records(tj), root, source=tj)
    return tj, root, splits


ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
TINY = ROOT / "params" / "tiny.yaml"
# the library-level run the step tests share: tiny.yaml, smaller samples, short answers
LIB_OVERRIDES = {"data.n_ships": 4, "data.n_scores": 4, "scores.methods": [], "eval.n_items": 2,
                 "eval.max_new_tokens": 4, "eval.benchmarks": ["safebench", "mmbench", "vlguard_unsafe"],
                 "eval.variants": ["dense", "pruned", "hsr"]}


def only(folder):
    """The one finished keyed folder under ``folder`` (e.g. ``<run>/prune``)."""
    found = [p for p in folder.iterdir() if (p / "_step.json").is_file()]
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="session")
def lib_run(tmp_path_factory):
    """A complete run through the library (data → evaluate), built once per session and shared
    read-only: ``(params, run_dir)``. Tests that write take :func:`run_copy`."""
    from hsr_lib import steps
    from hsr_lib.params import load_params
    from hsr_lib.runs import Run

    runs = tmp_path_factory.mktemp("lib_runs")
    run = Run.open(load_params(TINY, {"runs_dir": str(runs), "run_name": "lib", **LIB_OVERRIDES}), base=ROOT)
    steps.evaluate.run(run, progress=False)
    return run.params, run.dir


@pytest.fixture
def run_copy(lib_run, tmp_path):
    """``run_copy(**overrides)`` → a Run on a private copy of :func:`lib_run`'s directory."""
    import shutil

    from hsr_lib.runs import Run

    P, src = lib_run
    dst = tmp_path / "runs" / "lib"
    if not dst.exists():
        shutil.copytree(src, dst)

    def make(**overrides):
        return Run(P.replace({"runs_dir": str(dst.parent), **overrides}), dst)

    return make


def _hsr_run(params: str, tmp_path_factory):
    """``hsr run <params>`` end to end (every notebook) into a temporary runs_dir:
    ``(run_dir, completed_process)``."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    script = Path(sys.executable).parent / "hsr"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "hsr_lib.cli"]
    runs = tmp_path_factory.mktemp("runs")
    proc = subprocess.run([*cmd, "run", params, "-p", f"runs_dir={runs}"], cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return runs / yaml.safe_load((ROOT / params).read_text())["run_name"], proc


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """``hsr run params/tiny.yaml`` (the random-weight smoke run), once per session."""
    return _hsr_run("params/tiny.yaml", tmp_path_factory)


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory):
    """``hsr run params/toy.yaml`` (the README's `make run`), once per session."""
    return _hsr_run("params/toy.yaml", tmp_path_factory)


@pytest.fixture(scope="session")
def toy_story(tmp_path_factory):
    """The shipped toy's whole pipeline through the library (``toy_study.run_toy``), once per
    session and shared read-only: ``(run, numbers, summary)``."""
    from hsr_lib import toy_study

    return toy_study.run_toy("toy:qwen2_vl", tmp_path_factory.mktemp("toy_runs"))


@pytest.fixture
def fresh_lm():
    """``fresh_lm(name)`` → a new float32 CPU ``LoadedModel`` of ``tiny:<name>`` that a test may modify."""
    from hsr_lib.models import load_model

    return lambda name: load_model(f"tiny:{name}", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def calib_samples(synthetic_vlguard):
    """Three utility and three safety samples of the synthetic VLGuard set (prompt + response)."""
    _, _, splits = synthetic_vlguard
    return {"utility": splits["utility"][:3], "safety": splits["safety"][:3]}


_GUARD_TEMPLATE = ("{%- for m in messages -%}{%- if m.role == 'user' -%}{{- 'User: ' + m.content + '\\n' -}}"
                  "{%- else -%}{{- 'Agent: ' + m.content + '\\n' -}}{%- endif -%}{%- endfor -%}"
                  "{{- 'Provide your safety assessment for Agent in the above conversation:\\n' -}}")


def _tiny_guard(path, verdict: str):
    """A Llama-Guard-shaped stand-in: a tiny Llama whose weights make it always answer ``verdict``.

    Constant embeddings and zeroed attention/MLP outputs give one hidden state everywhere;
    lm_head then points it at the added token ``verdict``."""
    import torch
    from tokenizers import AddedToken
    from transformers import LlamaConfig, LlamaForCausalLM

    from hsr_lib.tiny import make_tokenizer

    tok = make_tokenizer("llama3")
    tok.add_tokens([AddedToken("unsafe", normalized=False), AddedToken("safe", normalized=False)])
    tok.chat_template = _GUARD_TEMPLATE
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.convert_tokens_to_ids(verdict)] = 1.0
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_guard():
    """``tiny_guard(folder, "safe" | "unsafe")`` saves a Llama-Guard-shaped stand-in judge there."""
    return _tiny_guard


def check_save_model_in_step(step, run, monkeypatch):
    """``step`` (steps.prune or steps.realign) with ``save_model`` on: a crash while saving leaves
    the step unfinished, the next run finishes it with the model, and a finished step missing its
    model gets it rebuilt without being recomputed. Returns the result."""
    import shutil

    def broken(lm, path):
        raise OSError("disk full")

    monkeypatch.setattr(step, "save_model_dir", broken)
    with pytest.raises(OSError, match="disk full"):
        step.run(run, progress=False)
    assert not run.is_done(step.spec(run.params))
    monkeypatch.undo()
    res = step.run(run, progress=False)
    assert (res.dir / "model" / "config.json").is_file()
    shutil.rmtree(res.dir / "model")
    marker = (res.dir / "_step.json").read_text()
    again = step.run(run, progress=False)
    assert (again.dir / "model" / "config.json").is_file() and (again.dir / "_step.json").read_text() == marker
    return again
