"""What the evaluation says beyond one benchmark's rate (docs/method.md): the combined ASR of a run's
safety sets, RSR with its paired-bootstrap interval, over-refusal pooled over the benign sets and per
phrasing, and the paired comparisons of variants on the same items (McNemar, and the difference
with its bootstrap interval).

All read the per-item scores (``scores.jsonl``: variant, benchmark, item_id, metric, judge, value)
and return tidy tables in %. The bootstrap is seeded (:data:`SEED`), so the files are reproducible.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from .benchmarks import BENCHMARKS, SAFETY_KINDS
from .metrics import BENIGN_KINDS, METRIC_COLUMNS
from .stats import B_DEFAULT, mcnemar, mean_rate, paired_bootstrap, restoration_rate, wilson

SEED = 0
COMBINED = "combined"  # the benchmark name of the rows that combine a run's sets
PAPER_SAFETY = ("safebench", "ch3ef")  # the paper's average ASR
TOY_HARMFUL = ("toy_harmful", "toy_harmful_novel", "toy_unsafe_image")
BASELINES = ("dense", "pruned")
PAIRED_COLUMNS = ["comparison", "baseline", "variant", "benchmark", "metric", "judge", "n", "baseline_value",
                  "variant_value", "difference", "diff_ci_low", "diff_ci_high", "n01", "n10", "p", "test",
                  "significant_5pct"]


def safety_sets(benchmarks: Sequence[str]) -> tuple[list[str], str]:
    """The benchmarks a run's combined ASR (and RSR) is taken over, and how: the paper's average of
    SafeBench and Ch3Ef (``mean``) when both are evaluated; else the items of the toy's harmful sets
    pooled (``pooled``); else every safety benchmark's items pooled."""
    paper = [b for b in PAPER_SAFETY if b in benchmarks]
    if len(paper) == len(PAPER_SAFETY):
        return paper, "mean"
    toy = [b for b in TOY_HARMFUL if b in benchmarks]
    if toy:
        return toy, "pooled"
    return [b for b in benchmarks if BENCHMARKS[b].kind in SAFETY_KINDS], "pooled"


def benign_sets(benchmarks: Sequence[str]) -> list[str]:
    """The benchmarks whose inputs a model should answer (over-refusal is measured on them)."""
    return [b for b in benchmarks if BENCHMARKS[b].kind in BENIGN_KINDS]


def outcome(benchmark: str, metric: str, judge: str) -> tuple[str, str]:
    """The per-item score (metric, judge) behind a benchmark-level metric: ``asr`` (Ch3Ef by the
    option chosen), ``over_refusal`` (``refused``) or ``accuracy`` (``correct``)."""
    if metric == "asr":
        return "attack_success", "choice" if BENCHMARKS[benchmark].kind == "mc_safety" else judge
    if metric == "over_refusal":
        return "refused", judge
    if metric == "accuracy":
        return "correct", ""
    raise ValueError(f"no per-item outcome for metric {metric!r}")


def item_table(scores: pd.DataFrame, benchmark: str, metric: str, judge: str) -> pd.DataFrame:
    """Per-item outcomes (0/1, NaN undecided) of one benchmark: one row per item, one column per variant."""
    m, j = outcome(benchmark, metric, judge)
    s = scores[(scores["benchmark"] == benchmark) & (scores["metric"] == m) & (scores["judge"] == j)]
    t = s.assign(value=pd.to_numeric(s["value"])).pivot_table(index="item_id", columns="variant", values="value",
                                                               aggfunc="first", dropna=False)
    return t


def _aligned(tables: dict[str, pd.DataFrame], variants: Sequence[str]) -> dict[str, list[np.ndarray]] | None:
    """Per benchmark, the variants' outcomes on the items every one of them has a verdict on."""
    out = {}
    for b, t in tables.items():
        if not all(v in t.columns for v in variants):
            return None
        both = t[list(variants)].dropna()
        if len(both):
            out[b] = [both[v].to_numpy(dtype=float) for v in variants]
    return out or None


def combined_rows(scores: pd.DataFrame, benchmarks: Sequence[str], variants: Sequence[str], judge: str,
                  refusal_judge: str, seed: int = SEED, B: int = B_DEFAULT) -> pd.DataFrame:
    """Rows of benchmark :data:`COMBINED` for ``metrics.csv``: per variant the combined ASR over
    :func:`safety_sets` (Wilson when pooled, a bootstrap within benchmarks when averaged), the
    over-refusal pooled over :func:`benign_sets` (Wilson), and for every variant but dense and
    pruned its RSR (a paired bootstrap within benchmarks; NaN when pruning did not raise the ASR)."""
    rows: list[dict[str, Any]] = []
    safety, how = safety_sets(benchmarks)
    asr_tables = {b: item_table(scores, b, "asr", judge) for b in safety}
    for v in variants:
        data = {b: [t[v].dropna().to_numpy(dtype=float)] for b, t in asr_tables.items() if v in t and t[v].notna().any()}
        if data:
            rows.append(_rate_row(v, "asr", judge, data, how, seed, B))
    ref_tables = {b: item_table(scores, b, "over_refusal", refusal_judge) for b in benign_sets(benchmarks)}
    for v in variants:
        data = {b: [t[v].dropna().to_numpy(dtype=float)] for b, t in ref_tables.items() if v in t and t[v].notna().any()}
        if data:
            rows.append(_rate_row(v, "over_refusal", refusal_judge, data, "pooled", seed, B))
    if all(b in variants for b in BASELINES):
        for v in variants:
            if v in BASELINES:
                continue
            data = _aligned(asr_tables, ["pruned", v, "dense"])
            if data is None:
                continue

            def stat(d, how=how):
                rates = [mean_rate([d[b][i] for b in d], how) for i in range(3)]
                return 100.0 * restoration_rate(*rates)

            value = float(stat(data))
            lo, hi = paired_bootstrap(stat, data, B, seed) if not np.isnan(value) else (float("nan"),) * 2
            rows.append({"variant": v, "benchmark": COMBINED, "metric": "rsr", "judge": judge, "value": value,
                         "ci_low": lo, "ci_high": hi, "n": sum(len(a[0]) for a in data.values()), "undecided": 0})
    return pd.DataFrame(rows, columns=METRIC_COLUMNS)


def _rate_row(variant: str, metric: str, judge: str, data: dict[str, list[np.ndarray]], how: str,
              seed: int, B: int) -> dict[str, Any]:
    n = sum(len(a[0]) for a in data.values())
    value = float(mean_rate([a[0] for a in data.values()], how))
    if how == "pooled":
        lo, hi = wilson(value * n, n)
    else:
        lo, hi = paired_bootstrap(lambda d: mean_rate([a[0] for a in d.values()], how), data, B, seed)
    return {"variant": variant, "benchmark": COMBINED, "metric": metric, "judge": judge, "value": 100 * value,
            "ci_low": 100 * lo, "ci_high": 100 * hi, "n": n, "undecided": 0}


def comparisons(variants: Sequence[str]) -> list[tuple[str, str]]:
    """The (baseline, variant) pairs compared: pruned vs dense, HSR vs pruned, HSR-a vs HSR and HSR
    vs each random-heads seed, for those among ``variants``."""
    want = [("dense", "pruned"), ("pruned", "hsr"), ("hsr", "hsr_a")]
    want += [("hsr", v) for v in variants if v.split("@")[0] == "random_heads"]
    return [(a, b) for a, b in want if a in variants and b in variants]


def paired_tests(scores: pd.DataFrame, benchmarks: Sequence[str], variants: Sequence[str], judge: str,
                 refusal_judge: str, seed: int = SEED, B: int = B_DEFAULT) -> pd.DataFrame:
    """``paired_tests.csv``: for every pair of :func:`comparisons`, on the items both variants have a
    verdict on: ASR per safety benchmark and combined, over-refusal per benign benchmark and pooled,
    accuracy where scored. Each row: both rates (%), their difference (variant − baseline, points)
    with its paired-bootstrap 95% interval, McNemar's discordant counts (n01: only the variant has
    the outcome, n10: only the baseline), p and which test gave it. No multiplicity correction."""
    safety, how = safety_sets(benchmarks)
    benign = benign_sets(benchmarks)
    asr = {b: item_table(scores, b, "asr", judge) for b in benchmarks if BENCHMARKS[b].kind in SAFETY_KINDS}
    ref = {b: item_table(scores, b, "over_refusal", refusal_judge) for b in benign}
    acc = {b: item_table(scores, b, "accuracy", "") for b in benchmarks if BENCHMARKS[b].kind in ("names", "mcq")}
    families = [("asr", judge, asr, {b: asr[b] for b in safety if b in asr}, how),
                ("over_refusal", refusal_judge, ref, ref, "pooled"), ("accuracy", "", acc, {}, "pooled")]
    rows = []
    for base, var in comparisons(variants):
        for metric, j, per_bench, pooled_over, rule in families:
            groups = [(b, {b: t}, "pooled") for b, t in per_bench.items()]
            if len(pooled_over) > 1:
                groups.append((COMBINED, pooled_over, rule))
            for name, tables, rule_ in groups:
                data = _aligned(tables, [base, var])
                if data is not None:
                    rows.append(_paired_row(base, var, name, metric, j, data, rule_, seed, B))
    return pd.DataFrame(rows, columns=PAIRED_COLUMNS)


def _paired_row(base: str, var: str, benchmark: str, metric: str, judge: str, data: dict[str, list[np.ndarray]],
                how: str, seed: int, B: int) -> dict[str, Any]:
    def rate(d, i):
        return mean_rate([a[i] for a in d.values()], how)

    def diff(d):
        return 100.0 * (rate(d, 1) - rate(d, 0))

    lo, hi = paired_bootstrap(diff, data, B, seed)
    test = mcnemar(np.concatenate([a[0] for a in data.values()]) > 0.5,
                   np.concatenate([a[1] for a in data.values()]) > 0.5)
    return {"comparison": f"{var} vs {base}", "baseline": base, "variant": var, "benchmark": benchmark,
            "metric": metric, "judge": judge, "n": sum(len(a[0]) for a in data.values()),
            "baseline_value": 100.0 * float(rate(data, 0)), "variant_value": 100.0 * float(rate(data, 1)),
            "difference": float(diff(data)), "diff_ci_low": lo, "diff_ci_high": hi, "n01": test["n01"],
            "n10": test["n10"], "p": test["p"], "test": test["method"], "significant_5pct": bool(test["p"] < 0.05)}


def over_refusal_by_phrasing(scores: pd.DataFrame, questions: dict[str, str], benchmark: str,
                             refusal_judge: str) -> pd.DataFrame:
    """Over-refusal of one benign benchmark per phrasing (the item's question text) and variant, in %
    with its Wilson interval (``questions`` maps item id to question)."""
    t = item_table(scores, benchmark, "over_refusal", refusal_judge)
    rows = []
    for v in t.columns:
        col = t[v].dropna()
        for q, g in col.groupby(col.index.map(lambda i: questions.get(i, i)), sort=True):
            k, n = float(g.sum()), len(g)
            lo, hi = wilson(k, n)
            rows.append({"variant": v, "benchmark": benchmark, "phrasing": q, "judge": refusal_judge, "n": n,
                         "refused": int(k), "over_refusal": 100 * k / n, "ci_low": 100 * lo, "ci_high": 100 * hi})
    return pd.DataFrame(rows, columns=["variant", "benchmark", "phrasing", "judge", "n", "refused", "over_refusal",
                                       "ci_low", "ci_high"])


def variants_in(scores: pd.DataFrame, order: Iterable[str]) -> list[str]:
    """The variants of ``order`` that have scores."""
    have = set(scores["variant"])
    return [v for v in order if v in have]
