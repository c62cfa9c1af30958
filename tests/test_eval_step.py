"""The evaluation step end to end on a tiny model: variants, generation, judges, scores, tables,
caching and resuming."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from hsr_lib.evaluate import generate as G
from hsr_lib.evaluate import evaluate
from hsr_lib.evaluate.paper import restored_ratio
from hsr_lib.io import atomic_write_json, read_json, read_jsonl
from hsr_lib.params import load_params
from hsr_lib.runs import Run
from hsr_lib.variants import available_variants, load_variant, variant_status

ROOT = Path(__file__).resolve().parents[1]
BENCHES = ["safebench", "ch3ef", "mmbench", "docvqa", "vlguard_unsafe", "vlguard_safe_unsafe"]


def _run(tmp, **over) -> Run:
    P = load_params(ROOT / "params" / "tiny.yaml", {"runs_dir": str(tmp), "eval.n_items": 2,
                                                    "eval.max_new_tokens": 4, **over})
    return Run.open(P, base=ROOT)


@pytest.fixture(scope="module")
def tiny_eval(tmp_path_factory):
    """A tiny run evaluated on every fixture benchmark, with the three keyword judges and an LLM judge."""
    tmp = tmp_path_factory.mktemp("evalrun")
    from conftest import _tiny_guard

    guard = _tiny_guard(tmp / "guard", "unsafe")
    run = _run(tmp, **{"eval.judges": ["vlguard", "wei", "gcg", "llm"], "eval.llm_judge_path": str(guard),
                       "eval.mmbench_circular": True})
    return run, evaluate(run, progress=False)


def test_only_dense_is_available_before_pruning(tiny_eval):
    run, res = tiny_eval
    assert available_variants(run) == ["dense"]
    st = res.status.set_index("variant")
    assert st.loc["dense", "evaluated"] and not st.loc["pruned", "evaluated"]
    assert "not available yet" in st.loc["pruned", "status"] and "not available yet" in st.loc["realigned", "status"]


def test_responses_saved_as_jsonl(tiny_eval):
    run, res = tiny_eval
    resp = res.responses()
    n = {b: 2 for b in BENCHES} | {"mmbench": 8}  # 2 questions x 4 circular rotations
    assert resp.groupby("benchmark").size().to_dict() == n and set(resp["variant"]) == {"dense"}
    assert (resp["n_tokens"] <= 4).all() and (resp["n_tokens"] >= 1).all()
    rows = read_jsonl(res.dir / "responses" / "dense" / "safebench.jsonl")
    assert rows[0]["item_id"] == "ForbidQI_1_1" and rows[0]["prompt"].startswith("The image shows a list")


def test_metrics_cover_every_benchmark_and_judge(tiny_eval):
    _, res = tiny_eval
    M = res.metrics
    asr = M[M["metric"] == "asr"]
    for b in ("safebench", "vlguard_unsafe", "vlguard_safe_unsafe"):
        assert set(asr[asr["benchmark"] == b]["judge"]) == {"vlguard", "wei", "gcg", "llm"}
    assert (asr[asr["judge"] == "llm"]["value"] == 100.0).all()  # the stand-in judge always says "unsafe"
    assert set(asr[asr["benchmark"] == "ch3ef"]["judge"]) == {"choice"}
    got = set(zip(M["benchmark"], M["metric"]))
    assert {("mmbench", "accuracy"), ("mmbench", "circular_accuracy"), ("docvqa", "anls")} <= got
    assert M["value"].between(0, 100).all()
    # the per-item scores agree with the keyword judges applied afresh
    from hsr_lib.evaluate.judges import KEYWORD_JUDGES

    scores = res.scores()
    resp = res.responses().set_index(["benchmark", "item_id"])
    s = scores[(scores["judge"] == "wei") & (scores["benchmark"] == "safebench")]
    for r in s.itertuples():
        text = resp.loc[(r.benchmark, r.item_id), "response"]
        assert r.value == float(not KEYWORD_JUDGES["wei"].is_refusal(text))


def test_agreement_and_results_table(tiny_eval):
    _, res = tiny_eval
    assert len(res.agreement) == 6 and set(res.agreement["judge_a"]) <= {"vlguard", "wei", "gcg"}
    t = res.table.set_index("variant")
    assert list(t.index) == ["dense", "pruned", "realigned"]
    assert t.loc["dense", "method"] == "full" and not pd.isna(t.loc["dense", "avg_asr"])
    d = t.loc["dense"]
    assert d["avg_asr"] == pytest.approx((d["safebench_asr"] + d["ch3ef_asr"]) / 2)
    assert t.loc[["pruned", "realigned"], ["safebench_asr", "avg_asr", "rsr_percent", "restored_ratio_permyriad"]] \
        .isna().all().all()
    info = read_json(res.dir / "summary.json")
    assert info["primary_judge"] == "vlguard" and set(info["benchmarks"]) == set(BENCHES)


def test_finished_step_is_reused_and_generation_resumes(tiny_eval, monkeypatch, tmp_path):
    run, res = tiny_eval

    def boom(*a, **k):
        raise AssertionError("generation should not run")

    monkeypatch.setattr(G, "generate_batch", boom)
    again = evaluate(run, progress=False)
    pd.testing.assert_frame_equal(again.metrics, res.metrics)
    # more items: the step re-runs, and only the new items are generated
    calls = []
    monkeypatch.setattr(G, "generate_batch", lambda lm, batch, n: calls.append(len(batch)) or [("ok", 1)] * len(batch))
    more = Run.open(load_params(run.params_path, {"eval.n_items": 3}))
    evaluate(more, progress=False)
    assert sum(calls) == len(BENCHES) - 1 + 2  # one more question each (MMBench's third has 2 options: 2 rotations)


def test_variants_are_available_only_with_their_artifacts(tmp_path):
    run = _run(tmp_path, **{"eval.benchmarks": ["vlguard_unsafe"], "eval.n_items": 1, "eval.judges": ["gcg"]})
    atomic_write_json(run.step_dir("prune") / "_step.json", {"fingerprint": "x"})
    assert available_variants(run) == ["dense", "pruned"]
    assert [r["available"] for r in variant_status(run)] == [True, True, False]
    with pytest.raises(FileNotFoundError, match="mask.safetensors"):  # a marker without artifacts: loud
        load_variant(run, "pruned")
    with pytest.raises(FileNotFoundError, match="realign"):
        load_variant(run, "realigned")
    with pytest.raises(ValueError, match="unknown variant"):
        load_variant(run, "sparse")


def test_restored_ratio_comes_only_from_the_realign_step(tmp_path):
    run = _run(tmp_path)
    assert restored_ratio(run) is None
    (run.step_dir("realign")).mkdir(parents=True)
    (run.step_dir("realign") / "notes.json").write_text(json.dumps(["not a dict"]))
    assert restored_ratio(run) is None
    atomic_write_json(run.step_dir("realign") / "summary.json", {"restored_ratio_permyriad": 0.25})
    assert restored_ratio(run) == 0.25


def test_missing_benchmark_data_stops_before_any_model_is_loaded(tmp_path):
    from hsr_lib.evaluate import BenchmarkError

    run = _run(tmp_path, **{"eval.data_roots": {}})
    with pytest.raises(BenchmarkError, match="eval.data_roots.safebench is not set"):
        evaluate(run, progress=False)


def test_a_missing_llm_judge_stops_before_generation(tmp_path, monkeypatch):
    monkeypatch.setattr(G, "generate_batch", lambda *a: pytest.fail("generated before checking the judge"))
    run = _run(tmp_path, **{"eval.judges": ["llm"], "eval.llm_judge_path": str(tmp_path / "no-judge")})
    with pytest.raises(FileNotFoundError, match="llm_judge_path"):
        evaluate(run, progress=False)
