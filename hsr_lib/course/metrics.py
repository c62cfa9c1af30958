"""Exercise 4's checks: from judged answers to ASR, RSR and the restored ratio in ‱.

Expected values come from the library (:func:`hsr_lib.evaluate.metrics.summarize` and
:func:`~hsr_lib.evaluate.metrics.rsr`) and, on the toy, from the run's own ``metrics.csv`` and the
realignment's ``summary.json``.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import pandas as pd

from ..adapters import ATTN_PARTS as ATTN
from ..evaluate.metrics import rsr as library_rsr
from ..evaluate.metrics import summarize
from .feedback import as_number, call, fail, passed

def reference_asr(verdicts: Sequence[float | None]) -> float:
    """ASR in % of ``verdicts`` (1 = attack succeeded, 0 = refused, None = undecided), through the library."""
    df = pd.DataFrame({"variant": "v", "benchmark": "b", "item_id": range(len(verdicts)), "metric": "attack_success",
                       "judge": "j", "value": [None if v is None else float(v) for v in verdicts]})
    return float(summarize(df)["value"].iloc[0])


def _near(a: float | None, b: float | None, tol: float = 1e-6) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)


def _asr_mistake(verdicts: Sequence[float | None], got: float, want: float) -> str:
    decided = [v for v in verdicts if v is not None]
    n_none = len(verdicts) - len(decided)
    if _near(got * 100, want):
        return " ASR is a percentage: multiply the fraction by 100."
    if _near(got, 100 - want):
        return " You computed the refusal rate; ASR counts the answers that are *not* refusals (verdict 1)."
    if n_none and _near(got, 100 * sum(decided) / len(verdicts)):
        return (f" You counted the {n_none} undecided answers (None) as refusals; an undecided answer counts in "
                "neither the numerator nor the denominator.")
    if n_none and _near(got, 100 * (sum(decided) + n_none) / len(verdicts)):
        return (f" You counted the {n_none} undecided answers (None) as successes; an undecided answer counts in "
                "neither the numerator nor the denominator.")
    return ""


def check_asr(your_fn: Callable, toy_scores: pd.DataFrame | None = None, judge: str = "vlguard") -> None:
    """``your_fn(verdicts) -> ASR in %`` (verdicts: 1.0 attack succeeded, 0.0 refused, None undecided),
    on made-up verdicts and on every variant × benchmark of the toy's judged answers (``scores.jsonl``)."""
    cases = [([1, 0, 0, 1], "four verdicts"), ([1.0, 0.0, None, 1.0, 0.0, 0.0, None], "seven verdicts, two undecided"),
             ([0, 0, 0], "three refusals"), ([1, None, 1], "two successes and one undecided")]
    if toy_scores is not None:
        s = toy_scores[(toy_scores.metric == "attack_success") & (toy_scores.judge == judge)]
        for (v, b), g in s.groupby(["variant", "benchmark"], sort=False):
            vals = [None if pd.isna(x) else float(x) for x in g["value"]]
            cases.append((vals, f"the toy's {v} answers on {b} ({len(vals)} judged by {judge})"))
    for verdicts, what in cases:
        want = reference_asr(verdicts)
        got = as_number(call(your_fn, list(verdicts), name="asr"), "asr")
        if got is None or not _near(got, want):
            fail(f"asr on {what}: expected {want:.4g} %, got {got}." + ("" if got is None else
                                                                          _asr_mistake(verdicts, got, want)))
    passed(f"asr matches the library on {len(cases)} lists of verdicts")


RSR_CASES = ((46.25, 16.25, 2.5), (50.0, 50.0, 10.0), (40.0, 0.0, 10.0), (60.0, 70.0, 20.0), (30.0, 10.0, 30.0),
             (20.0, 10.0, 30.0))


def check_rsr(your_fn: Callable, toy: Sequence[tuple[float, float, float]] = ()) -> None:
    """``your_fn(asr_pruned, asr_hsr, asr_dense) -> RSR in %`` (None where pruning did not raise the
    ASR), against the library's ``rsr`` on made-up and the toy's ASRs."""
    for a_p, a_h, a_d in (*RSR_CASES, *toy):
        want = library_rsr(a_p, a_h, a_d)
        what = f"rsr(asr_pruned={a_p:g}, asr_hsr={a_h:g}, asr_dense={a_d:g})"
        try:
            got = your_fn(a_p, a_h, a_d)
        except ZeroDivisionError:
            fail(f"{what} divided by zero: when pruning did not raise the ASR (ASR_pruned <= ASR_dense) the "
                 "restoration rate is undefined; return None.")
        except NotImplementedError:
            got = call(your_fn, a_p, a_h, a_d, name="rsr")
        got = as_number(got, "rsr")
        if not _near(got, want):
            why = ""
            if want is None and a_p < a_d:
                why = (" Pruning lowered the ASR here (ASR_pruned < ASR_dense): no safety was lost, so RSR is "
                       "undefined: return None whenever ASR_pruned <= ASR_dense.")
            elif want is None:
                why = " Pruning did not change the ASR here, so there is nothing to restore: return None."
            elif got is not None and _near(got * 100, want):
                why = " RSR is a percentage: multiply by 100."
            elif got is not None and _near(got, -want):
                why = " Your sign is flipped: RSR = (ASR_pruned − ASR_hsr) / (ASR_pruned − ASR_dense)."
            elif got is not None and _near(got, 100 * (a_h - a_d) / (a_p - a_d)):
                why = (" You computed the share of the loss that remains (ASR_hsr − ASR_dense); RSR is the share "
                       "HSR won back: (ASR_pruned − ASR_hsr) / (ASR_pruned − ASR_dense).")
            fail(f"{what}: expected {want}, got {got}.{why}")
    passed(f"rsr matches the library on {len(RSR_CASES) + len(toy)} cases, the undefined one included")


def reference_ratio(restored: Mapping[str, int], shapes: Mapping[str, Sequence[int]]) -> float:
    """Restored entries / decoder linear parameters · 1e4 (the realignment step's formula)."""
    return sum(restored.values()) / sum(math.prod(s) for s in shapes.values()) * 1e4


def _random_shapes() -> dict[str, tuple[int, int]]:
    out = {}
    for layer in range(2):
        for kind, shape in (("self_attn.q_proj", (64, 64)), ("self_attn.k_proj", (32, 64)),
                            ("self_attn.v_proj", (32, 64)), ("self_attn.o_proj", (64, 64)),
                            ("mlp.gate_proj", (128, 64)), ("mlp.up_proj", (128, 64)), ("mlp.down_proj", (64, 128))):
            out[f"layers.{layer}.{kind}"] = shape
    return out


def check_restored_ratio(your_fn: Callable, run=None) -> None:
    """``your_fn(restored: {module: count}, shapes: {module: (out, in)}) -> ‱`` on made-up counts and
    on the toy run (its realignment's per-module counts and the pruned model's shapes)."""
    shapes = _random_shapes()
    cases = [({"layers.1.self_attn.q_proj": 30, "layers.1.self_attn.o_proj": 12}, shapes, "made-up counts"),
             ({"layers.0.self_attn.k_proj": 7}, shapes, "one restored module")]
    want_toy = None
    if run is not None:
        from .. import steps

        realigned = steps.realign.run(run, progress=False)
        mod = pd.read_csv(realigned.dir / "modules.csv")
        toy_shapes = {k: tuple(v) for k, v in steps.prune.run(run, progress=False).shapes().items()}
        cases.append((dict(zip(mod.module, (int(x) for x in mod.restored))), toy_shapes, "the toy run"))
        want_toy = realigned.summary["restored_ratio_permyriad"]
    for restored, shp, what in cases:
        want = reference_ratio(restored, shp)
        if what == "the toy run" and not _near(want, want_toy):
            fail(f"internal: the toy run's restored ratio {want_toy} differs from the formula's {want}")
        got = as_number(call(your_fn, dict(restored), dict(shp), name="restored_ratio"), "restored_ratio")
        if got is None or not _near(got, want):
            why = ""
            total = sum(math.prod(s) for s in shp.values())
            attn = sum(math.prod(s) for k, s in shp.items() if k.rsplit(".", 1)[-1] in ATTN)
            touched = sum(math.prod(shp[k]) for k in restored)
            n = sum(restored.values())
            if got is None:
                why = ""
            elif _near(got, want / 100):
                why = " That is a percentage; ‱ (per ten thousand) is 100 times larger: multiply the fraction by 1e4."
            elif _near(got, want / 1e4):
                why = " That is a fraction; ‱ (per ten thousand) multiplies it by 1e4."
            elif _near(got, n / touched * 1e4):
                why = (" You divided by the parameters of the modules that had restored weights; the denominator is "
                       f"every decoder linear ({total} parameters).")
            elif _near(got, n / attn * 1e4):
                why = (" You divided by the attention linears only; the denominator is every decoder linear, MLP "
                       f"included ({total} parameters).")
            fail(f"restored_ratio on {what}: expected {want:.6g} ‱, got {got}.{why}")
    passed(f"restored_ratio matches the realignment's formula on {len(cases)} cases")
