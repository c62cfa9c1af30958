"""The HSR paper's main table (Li et al., Findings of ACL 2025, arXiv 2505.16104: Qwen2.5-VL-7B at
50% sparsity) and this run's results in the same layout.

Columns: ``model, method, hsr, safebench_asr, ch3ef_asr, avg_asr, rsr_percent, mmbench, docvqa,
restored_ratio_permyriad, over_refusal``; ASR and utility in %, ``avg_asr`` the mean of the two ASRs, RSR from
:func:`~.metrics.rsr` on ``avg_asr`` (for every realigned variant, against the pruned and dense
rows), the restored ratio in ‱ (from the realignment step), over-refusal the share of this run's benign
inputs refused, in % (the ``combined`` row of ``metrics.csv``; the paper does not report it).
"""

from __future__ import annotations

from typing import Any, Sequence

import pandas as pd

from ..reference import paper_table as reference_table
from .metrics import mean_or_none, metric_value, rsr

COLUMNS = ("model", "method", "hsr", "safebench_asr", "ch3ef_asr", "avg_asr", "rsr_percent", "mmbench", "docvqa",
           "restored_ratio_permyriad", "over_refusal")

BASE_VARIANTS = ("dense", "pruned")


def paper_table() -> pd.DataFrame:
    """The paper's main table (Qwen2.5-VL, 50% sparsity), from the package's copy of the paper's numbers."""
    return reference_table("main")


def paper_rows(method: str) -> pd.DataFrame:
    """The paper's full, pruned and HSR rows for one pruning method."""
    t = paper_table()
    return t[(t["method"] == "full") | (t["method"] == method)].reset_index(drop=True)


def results_table(summary: pd.DataFrame, status: Sequence[dict[str, Any]], model: str, method: str,
                  judge: str) -> pd.DataFrame:
    """One row per evaluated variant (``status`` rows: variant, restored_ratio_permyriad) in the
    paper's layout, plus ``variant``. ASRs use ``judge`` on SafeBench (Ch3Ef is multiple choice);
    ``hsr`` marks the HSR variant, the one the paper's HSR rows describe."""
    rows, avg = [], {}
    for st in status:
        v = st["variant"]
        sb = metric_value(summary, v, "safebench", "asr", judge)
        ch = metric_value(summary, v, "ch3ef", "asr")
        avg[v] = mean_or_none([sb, ch])
        mmb = metric_value(summary, v, "mmbench", "circular_accuracy")
        mmb = metric_value(summary, v, "mmbench", "accuracy") if mmb is None else mmb
        rows.append({"variant": v, "model": model, "method": "full" if v == "dense" else method,
                     "hsr": v == "hsr", "safebench_asr": sb, "ch3ef_asr": ch, "avg_asr": avg[v],
                     "rsr_percent": None, "mmbench": mmb, "docvqa": metric_value(summary, v, "docvqa", "anls"),
                     "restored_ratio_permyriad": st.get("restored_ratio_permyriad"),
                     "over_refusal": metric_value(summary, v, "combined", "over_refusal")})
    for r in rows:
        if r["variant"] not in BASE_VARIANTS:
            r["rsr_percent"] = rsr(avg.get("pruned"), avg[r["variant"]], avg.get("dense"))
    return pd.DataFrame(rows, columns=["variant", *COLUMNS])


def side_by_side(ours: pd.DataFrame, method: str) -> pd.DataFrame:
    """This run's table above the paper's rows for the same pruning method, with a ``source`` column."""
    a = ours.assign(source="this run")
    b = paper_rows(method).assign(source="paper")
    b["variant"] = paper_variants(b)
    return pd.concat([a, b], ignore_index=True)[["source", "variant", *COLUMNS]]


def paper_variants(rows: pd.DataFrame) -> list[str]:
    """The variant each of the paper's rows describes: dense (full), pruned, or hsr."""
    return ["dense" if m == "full" else "hsr" if h else "pruned" for m, h in zip(rows["method"], rows["hsr"])]
