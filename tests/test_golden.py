"""Fidelity against golden fixtures made by running the authors' released code (tests/golden/).

Two tiny LLaVA-NeXT checkpoints (``mha``: Vicuna-style, 4 heads; ``gqa``: Llama-3-style, 4 query
heads over 2 KV heads) went through the released Ships, Wanda dump, pruning and realignment
under torch 2.5.1 / transformers 4.47.1 (tests/golden/README.md). Here the package runs the same
data in ``reference`` mode and must agree: sampled records and token ids exactly, Ships within
1e-3 degrees, scores within rtol 1e-5, masks exactly, except where a difference is a numerical
tie (:func:`assert_ties`). SparseGPT is compared with IST-DASLab's ``fasterprune`` on a fixed
layer and fixed inputs.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT

GOLDEN = ROOT / "tests" / "golden" / "data"
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
SETTINGS = {s["name"]: s for s in MANIFEST["settings"]}
TIE_RTOL = 4e-6  # about 32 fp32 ulps: another CPU's kernels can flip a 1-ulp tie


def golden_params(case: str, runs_dir, **extra):
    from hsr_lib.params import load_params

    over = {"runs_dir": str(runs_dir), "run_name": case, "fidelity": "reference",
            "model.name": str(GOLDEN / case / "model"), "model.family": "llava_next", "model.dtype": "float32",
            "model.device": "cpu", "model.attn_implementation": "eager", "ships.dtype": "float32",
            "data.vlguard_root": str(GOLDEN / "vlguard"), "data.n_ships": MANIFEST["n_ships"],
            "data.n_scores": MANIFEST["n_calibration"], "pruning.method": "wanda", "pruning.sparsity": 0.5,
            "realign.top_h": 4, **extra}
    return load_params(None, over)


@pytest.fixture(scope="module", params=["mha", "gqa"])
def golden(request, tmp_path_factory):
    """``(case, runs_dir)``: the case's unstructured pruning, scores and Ships, computed once."""
    from hsr_lib import steps
    from hsr_lib.runs import Run

    case = request.param
    runs = tmp_path_factory.mktemp(f"golden_{case}")
    run = Run.open(golden_params(case, runs), base=ROOT)
    steps.prune.run(run, progress=False)
    steps.scores.run(run, progress=False)
    steps.ships.run(run, progress=False)
    return case, runs


def open_run(case, runs, **extra):
    from hsr_lib.runs import Run

    return Run.open(golden_params(case, runs, **extra), base=ROOT)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_sampled_records_and_token_ids(golden):
    from hsr_lib import steps

    case, runs = golden
    run = open_run(case, runs)
    want = json.loads((GOLDEN / case / "ships_tokens.json").read_text())
    got = read_jsonl(steps.ships.load(run).dir / "prompts.jsonl")
    assert [g["id"] for g in got] == [w["id"] for w in want]
    for g, w in zip(got, want):
        assert g["input_ids"] == w["input_ids"] and g["image_sizes"] == [w["image_sizes"]]
        assert g["last"] == len(w["input_ids"]) - 1
    cal = json.loads((GOLDEN / case / "calibration_tokens.json").read_text())
    sc = steps.scores.load(run)
    for which, mode in (("utility", "train_safes"), ("safety", "train_unsafes")):
        got = read_jsonl(sc.dir / f"tokens_{which}.jsonl")
        assert [g["id"] for g in got] == [w["id"] for w in cal[mode]], which
        for g, w in zip(got, cal[mode]):
            assert g["input_ids"] == w["input_ids"], (which, g["id"])
            assert list(range(g["start"], g["end"])) == w["response"], (which, g["id"])
    if case == "gqa":  # the released Llama-3 loaders: BOS twice in Ships prompts, once in calibration text
        bos = want[0]["input_ids"][0]
        assert want[0]["input_ids"][:2] == [bos, bos] and cal["train_safes"][0]["input_ids"][1] != bos


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_ships_equal_the_released_scores(golden, attn):
    from hsr_lib import steps
    from hsr_lib.ships import select_heads

    case, runs = golden
    extra = {} if attn == "eager" else {"model.attn_implementation": "sdpa", "ships.non_causal": True}
    run = open_run(case, runs, **extra)
    got = steps.ships.run(run, progress=False).scores
    want = json.loads((GOLDEN / case / f"ships_{attn}.json").read_text())
    assert list(got) == list(want)
    worst = max(abs(got[k] - want[k]) for k in want)
    assert worst <= 1e-3, f"{case}/{attn}: Ships differ by up to {worst:.2e} degrees"
    for top_h in sorted({s["top_h"] for s in SETTINGS.values()}):
        assert set(select_heads(got, top_h)) == set(select_heads(want, top_h)), top_h


def test_wanda_scores_equal_the_released_dumps(golden):
    from hsr_lib import steps

    case, runs = golden
    sc = steps.scores.load(open_run(case, runs))
    for which in ("safety", "utility"):
        want, got = load_file(GOLDEN / case / f"wanda_{which}.safetensors"), sc.load(which)
        assert set(got) == set(want)
        for k in want:
            torch.testing.assert_close(got[k].float(), want[k], rtol=1e-5, atol=1e-7 * float(want[k].abs().max()),
                                       msg=lambda m, k=k: f"{case} {which} {k}: {m}")


def assert_ties(ours: torch.Tensor, theirs: torch.Tensor, scores: torch.Tensor, groups: int, name: str) -> None:
    """Every entry decided differently is a numerical tie: within each decision group (a row, or
    a block of M columns of a row) the differing entries' scores lie within TIE_RTOL of each other."""
    diff = (ours != theirs).view(ours.shape[0], -1, groups)
    s = scores.float().view(ours.shape[0], -1, groups)
    for r, b in torch.nonzero(diff.any(-1)).tolist():
        vals = s[r, b][diff[r, b]]
        assert float(vals.max() - vals.min()) <= TIE_RTOL * float(vals.abs().max()), \
            f"{name} row {r}: entries decided differently have scores {vals.tolist()}: not a tie"


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_pruned_masks_equal_the_released_pruning(golden, pattern):
    from hsr_lib import steps
    from hsr_lib.models import load_from_params
    from hsr_lib.scores import compute_scores

    case, runs = golden
    run = open_run(case, runs, **{"pruning.pattern": pattern})
    got = steps.prune.run(run, progress=False).mask()
    want = {k: v.bool() for k, v in load_file(GOLDEN / case / f"pruned_{pattern.replace(':', 'of')}.safetensors").items()}
    assert set(got) == set(want)
    differing = sorted({int(k.split(".")[1]) for k in want if not torch.equal(got[k], want[k])})
    for layer in differing:  # feed this layer the released run's own pruned earlier layers, then check for ties
        lm = load_from_params(run.params)
        with torch.no_grad():
            for k, lin in lm.prunable_linears().items():
                if int(k.split(".")[1]) < layer:
                    lin.weight.masked_fill_(want[k], 0)
        samples = steps.data.load(run).load("scores_utility")
        U = compute_scores(lm, samples, ["wanda"], "reference", progress=False)["wanda"]
        for k in [k for k in want if int(k.split(".")[1]) == layer]:
            cols = want[k].shape[1] if pattern == "unstructured" else 4
            assert_ties(got[k], want[k], U[k], cols, f"{case} {pattern} {k}")


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_realigned_masks_equal_the_released_realignment(golden, setting):
    from hsr_lib import steps

    case, runs = golden
    s = SETTINGS[setting]
    run = open_run(case, runs, **{"pruning.pattern": s["pattern"], "realign.p": s["p"], "realign.q": s["q"],
                                  "realign.p_max": s["p_max"], "realign.top_h": s["top_h"]})
    res = steps.realign.run(run, progress=False)
    want = {k: v.bool() for k, v in load_file(GOLDEN / case / f"realigned_{setting}.safetensors").items()}
    got, base = res.mask(), res.base_mask()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), f"{case} {setting} {k}: {int((got[k] != want[k]).sum())} entries differ"
    restored = sum(int((base[k] & ~want[k]).sum()) for k in want)
    assert res.summary["restored"] == restored
    assert (restored == 0) == (setting == "none")


@pytest.mark.parametrize("pattern", ["unstructured", "2of4"])
def test_sparsegpt_equals_the_original(pattern):
    from hsr_lib.sparsegpt import sparsegpt_prune

    g = load_file(GOLDEN / "sparsegpt.safetensors")
    W, H, want = g["W"], g["H"], g[f"W_{pattern}"]
    got, mask, _ = sparsegpt_prune(W, H, 0.5, pattern.replace("of", ":"), blocksize=128, percdamp=0.01)
    scale = float(W.abs().max())
    assert float((got - want).abs().max()) <= 1e-5 * scale
    assert torch.equal(mask, want == 0)
    assert torch.equal(got == 0, want == 0)


def test_the_tie_check_tells_ties_from_real_differences():
    scores = torch.tensor([[1.0, 2.0, 2.0 * (1 + 1e-7), 5.0]])
    ours = torch.tensor([[True, True, False, False]])
    theirs = torch.tensor([[True, False, True, False]])  # entries 1 and 2 swapped: a tie
    assert_ties(ours, theirs, scores, 4, "tie")
    with pytest.raises(AssertionError, match="not a tie"):
        assert_ties(ours, torch.tensor([[False, True, True, False]]), scores, 4, "no tie")  # 1.0 vs 2.0


def test_a_reference_file_runs_on_a_local_checkpoint_and_vlguard_folder(tmp_path):
    """The README's recipe: a reference params file with the model and the VLGuard folder pointed
    at local copies (here the small fixture set, hence ``all`` samples and 4 of its 8 heads)."""
    from hsr_lib import steps
    from hsr_lib.params import load_params
    from hsr_lib.runs import Run

    P = load_params(ROOT / "params" / "reference_llava_next_vicuna_7b.yaml",
                    {"model.name": str(GOLDEN / "mha" / "model"), "data.vlguard_root": str(GOLDEN / "vlguard"),
                     "runs_dir": str(tmp_path), "data.n_ships": "all", "data.n_scores": "all", "realign.top_h": 4})
    assert (P.fidelity, P.model.dtype, P.ships.dtype) == ("reference", "float16", "float32")
    run = Run.open(P, base=ROOT)
    res = steps.realign.run(run, progress=False)
    assert steps.ships.load(run).summary["dtype"] == "float32"
    assert res.summary["fidelity"] == "reference" and res.summary["built_from"] == "dense"
    assert res.summary["restored"] > 0 and (res.dir / "base_mask.safetensors").is_file()
    assert len(read_jsonl(steps.scores.load(run).dir / "tokens_utility.jsonl")) == 20
