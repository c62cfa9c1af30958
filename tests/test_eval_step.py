"""The evaluation step end to end on a copy of the shared tiny run: variants, generation, judges,
scores, tables, caching and resuming."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from hsr_lib import steps
from hsr_lib.evaluate import generate as G
from hsr_lib.io import read_json, read_jsonl
from hsr_lib.runs import Run

ROOT = Path(__file__).resolve().parents[1]
BENCHES = ["safebench", "ch3ef", "mmbench", "docvqa", "vlguard_unsafe", "vlguard_safe_unsafe", "vlguard_safe_safe"]
VARIANTS = ["dense", "pruned", "hsr", "random_heads@1"]


def _eval_params(P, tmp, **over):
    return P.replace({"runs_dir": str(tmp), "eval.benchmarks": BENCHES, "eval.variants": VARIANTS, **over})


@pytest.fixture(scope="module")
def tiny_eval(lib_run, tmp_path_factory):
    """A copy of the shared run evaluated on every fixture benchmark, with the three keyword judges
    and an LLM judge, four variants (one of them computed on demand: random heads, seed 1)."""
    from conftest import _tiny_guard

    P, src = lib_run
    tmp = tmp_path_factory.mktemp("evalrun")
    shutil.copytree(src, tmp / "lib")
    guard = _tiny_guard(tmp / "guard", "unsafe")
    run = Run(_eval_params(P, tmp, **{"eval.judges": ["vlguard", "wei", "gcg", "llm"],
                                      "eval.llm_judge_path": str(guard), "eval.mmbench_circular": True}), tmp / "lib")
    return run, steps.evaluate.run(run, progress=False)


def test_every_named_variant_is_evaluated_from_its_artifacts(tiny_eval):
    run, res = tiny_eval
    st = res.status.set_index("variant")
    assert list(st.index) == VARIANTS and st["evaluated"].all()
    assert st.loc["dense", "from"] == "the params' model" and st.loc["pruned", "from"].startswith("prune/wanda-0.5-")
    assert st.loc["hsr", "from"].startswith("realign/hsr-") and st.loc["random_heads@1", "from"].startswith(
        "realign/random_heads-p0.5-q0.5-pmax0.7-h4-s1-")
    assert st.loc["hsr", "restored_ratio_permyriad"] == steps.realign.load(run).summary["restored_ratio_permyriad"]


def test_responses_saved_as_jsonl_per_variant(tiny_eval):
    run, res = tiny_eval
    resp = res.responses()
    n = {b: 2 * len(VARIANTS) for b in BENCHES} | {"mmbench": 8 * len(VARIANTS)}  # 2 questions x 4 rotations
    assert resp.groupby("benchmark").size().to_dict() == n and set(resp["variant"]) == set(VARIANTS)
    assert (resp["n_tokens"] <= 4).all() and (resp["n_tokens"] >= 1).all()
    folder = run.dir / "evaluate" / "responses" / steps.evaluate.responses_key(run.params, "dense")
    rows = read_jsonl(folder / "safebench.jsonl")
    assert rows[0]["item_id"] == "ForbidQI_1_1" and rows[0]["prompt"].startswith("The image shows a list")
    assert folder.name.startswith("dense-")
    assert steps.evaluate.responses_key(run.params, "random_heads@1").startswith("random_heads-s1-")


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
    assert M[M["metric"] != "rsr"]["value"].between(0, 100).all()
    # the per-item scores agree with the keyword judges applied afresh
    from hsr_lib.evaluate.judges import KEYWORD_JUDGES

    scores = res.scores()
    resp = res.responses().set_index(["variant", "benchmark", "item_id"])
    s = scores[(scores["judge"] == "wei") & (scores["benchmark"] == "safebench")]
    assert len(s) == 2 * len(VARIANTS)
    for r in s.itertuples():
        text = resp.loc[(r.variant, r.benchmark, r.item_id), "response"]
        assert r.value == float(not KEYWORD_JUDGES["wei"].is_refusal(text))


def test_over_refusal_intervals_and_paired_tests(tiny_eval):
    from hsr_lib.evaluate.metrics import keyword_refusal
    from hsr_lib.evaluate.judges import VLGUARD
    from hsr_lib.evaluate.stats import mcnemar, wilson

    _, res = tiny_eval
    M, scores = res.metrics, res.scores()
    over = M[M["metric"] == "over_refusal"]
    assert set(over["benchmark"]) == {"mmbench", "docvqa", "vlguard_safe_safe", "combined"}
    assert set(over["judge"]) == {"vlguard"}  # the first judge's keywords
    resp = res.responses().set_index(["variant", "benchmark", "item_id"]).sort_index()
    r = over[(over["benchmark"] == "vlguard_safe_safe") & (over["variant"] == "hsr")].iloc[0]
    refused = [keyword_refusal(VLGUARD, t) for t in resp.loc[("hsr", "vlguard_safe_safe"), "response"]]
    assert r["value"] == pytest.approx(100 * sum(refused) / len(refused)) and r["n"] == len(refused) == 2
    assert (r["ci_low"], r["ci_high"]) == pytest.approx(tuple(100 * x for x in wilson(sum(refused), len(refused))))
    rates = M[M["metric"].isin(["asr", "accuracy", "over_refusal", "anls"])]
    assert rates[["ci_low", "ci_high"]].notna().all().all()
    assert ((rates["ci_low"] <= rates["value"] + 1e-9) & (rates["value"] <= rates["ci_high"] + 1e-9)).all()
    assert set(M[M["metric"] == "rsr"]["variant"]) == {"hsr", "random_heads@1"}
    combined = M[(M["benchmark"] == "combined") & (M["metric"] == "asr")].set_index("variant")["value"]
    assert combined["dense"] == pytest.approx(res.table.set_index("variant").loc["dense", "avg_asr"])
    t = res.paired_tests
    assert list(dict.fromkeys(t["comparison"])) == ["pruned vs dense", "hsr vs pruned", "random_heads@1 vs hsr"]
    row = t[(t["comparison"] == "hsr vs pruned") & (t["benchmark"] == "safebench") & (t["metric"] == "asr")].iloc[0]
    s = scores[(scores["benchmark"] == "safebench") & (scores["metric"] == "attack_success")
               & (scores["judge"] == "vlguard")].pivot(index="item_id", columns="variant", values="value")
    want = mcnemar(s["pruned"].astype(float) > 0.5, s["hsr"].astype(float) > 0.5)
    assert (row["n01"], row["n10"], row["p"], row["test"]) == (want["n01"], want["n10"], pytest.approx(want["p"]),
                                                               "exact")
    assert row["diff_ci_low"] <= row["difference"] <= row["diff_ci_high"]


def test_agreement_and_results_table(tiny_eval):
    _, res = tiny_eval
    assert len(res.agreement) == 6 and set(res.agreement["judge_a"]) <= {"vlguard", "wei", "gcg"}
    t = res.table.set_index("variant")
    assert list(t.index) == VARIANTS
    assert t.loc["dense", "method"] == "full" and not pd.isna(t.loc["dense", "avg_asr"])
    d = t.loc["dense"]
    assert d["avg_asr"] == pytest.approx((d["safebench_asr"] + d["ch3ef_asr"]) / 2)
    assert t.loc["hsr", "hsr"] and not t.loc["random_heads@1", "hsr"]
    info = read_json(res.dir / "summary.json")
    assert info["primary_judge"] == "vlguard" and set(info["benchmarks"]) == set(BENCHES)


def test_finished_step_is_reused_and_generation_resumes(tiny_eval, monkeypatch):
    run, res = tiny_eval

    def boom(*a, **k):
        raise AssertionError("generation should not run")

    monkeypatch.setattr(G, "generate_batch", boom)
    again = steps.evaluate.run(run, progress=False)
    pd.testing.assert_frame_equal(again.metrics, res.metrics)
    # a variant fewer: a new evaluation key, no generation at all (every answer is saved)
    fewer = steps.evaluate.run(run.using(run.params.replace({"eval.variants": ["dense", "hsr"]})), progress=False)
    assert fewer.dir != res.dir and list(fewer.table["variant"]) == ["dense", "hsr"]
    # more items: only the new items are generated
    calls = []
    monkeypatch.setattr(G, "generate_batch", lambda lm, batch, n: calls.append(len(batch)) or [("ok", 1)] * len(batch))
    steps.evaluate.run(run.using(run.params.replace({"eval.n_items": 3})), progress=False)
    # one more question each per variant (MMBench's third has 2 options: 2 rotations)
    assert sum(calls) == (len(BENCHES) - 1 + 2) * len(VARIANTS)


def test_a_variant_refuses_to_build_without_its_artifacts(tmp_path, lib_run):
    P, _ = lib_run
    run = Run.open(P.replace({"runs_dir": str(tmp_path), "eval.variants": ["dense", "hsr_a"]}))
    st = steps.variants.status(run, ["dense", "pruned", "hsr_a"])
    assert [r["available"] for r in st] == [True, False, False] and "not computed yet (prune/" in st[1]["note"]
    with pytest.raises(steps.MissingUpstream, match="prune/wanda-0.5-unstructured-"):
        steps.variants.load_variant(run, "pruned", upstream="refuse")
    with pytest.raises(steps.MissingUpstream, match="realign/hsr_a-p0.5-q0.5-pmax0.7-h4-"):
        steps.evaluate.run(run, upstream="refuse", progress=False)
    with pytest.raises(ValueError, match="unknown variant 'sparse'"):
        steps.variants.parse("sparse")
    with pytest.raises(ValueError, match="unknown variant 'hsr@2'"):
        steps.variants.parse("hsr@2")


def test_missing_benchmark_data_stops_before_any_model_is_loaded(tmp_path, lib_run):
    from hsr_lib.evaluate import BenchmarkError

    run = Run.open(_eval_params(lib_run[0], tmp_path, **{"eval.data_roots": {}}))
    with pytest.raises(BenchmarkError, match="eval.data_roots.safebench is not set"):
        steps.evaluate.run(run, progress=False)


def test_a_missing_llm_judge_stops_before_generation(tmp_path, monkeypatch, lib_run):
    monkeypatch.setattr(G, "generate_batch", lambda *a: pytest.fail("generated before checking the judge"))
    run = Run.open(_eval_params(lib_run[0], tmp_path, **{"eval.judges": ["llm"],
                                                        "eval.llm_judge_path": str(tmp_path / "no-judge")}))
    with pytest.raises(FileNotFoundError, match="llm_judge_path"):
        steps.evaluate.run(run, progress=False)
