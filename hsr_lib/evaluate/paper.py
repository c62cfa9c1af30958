"""The HSR paper's main table (Li et al., Findings of ACL 2025, arXiv 2505.16104: Qwen2.5-VL-7B at
50% sparsity) and this run's results in the same layout.

Columns: ``model, method, hsr, safebench_asr, ch3ef_asr, avg_asr, rsr_percent, mmbench, docvqa,
restored_ratio_permyriad``; ASR and utility in %, ``avg_asr`` the mean of the two ASRs, RSR from
:func:`~.metrics.rsr` on ``avg_asr``, the restored ratio in ‱ (from the realignment step).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from ..io import read_json
from ..runs import Run
from .metrics import mean_or_none, metric_value, rsr

COLUMNS = ("model", "method", "hsr", "safebench_asr", "ch3ef_asr", "avg_asr", "rsr_percent", "mmbench", "docvqa",
           "restored_ratio_permyriad")

PAPER_MAIN = Path(__file__).resolve().parent.parent / "reference_data" / "paper" / "main_results_qwen2.5-vl.csv"


def paper_table() -> pd.DataFrame:
    """The paper's main table (Qwen2.5-VL, 50% sparsity), from the package's copy of the paper's numbers."""
    return pd.read_csv(PAPER_MAIN)


def paper_rows(method: str) -> pd.DataFrame:
    """The paper's full, pruned and HSR rows for one pruning method."""
    t = paper_table()
    return t[(t["method"] == "full") | (t["method"] == method)].reset_index(drop=True)


def restored_ratio(run: Run) -> float | None:
    """The restored ratio (‱) the realignment step recorded, or None while there is none.

    Looks for a ``restored_ratio_permyriad`` number in the JSON files of ``<run>/realign/``
    (written by the realignment issue; nothing is invented when it is absent)."""
    folder = run.step_dir("realign")
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            data = read_json(path)
        except ValueError:
            continue
        value = data.get("restored_ratio_permyriad") if isinstance(data, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def results_table(summary: pd.DataFrame, status: Sequence[dict[str, Any]], model: str, method: str,
                  judge: str, ratio: float | None = None) -> pd.DataFrame:
    """This run's dense / pruned / realigned rows in the paper's layout, plus ``variant`` and ``status``.

    ASRs use ``judge`` on SafeBench (Ch3Ef is multiple choice); a variant that was not evaluated
    keeps empty cells and says why in ``status``."""
    rows, avg = [], {}
    for st in status:
        v = st["variant"]
        sb = metric_value(summary, v, "safebench", "asr", judge)
        ch = metric_value(summary, v, "ch3ef", "asr")
        avg[v] = mean_or_none([sb, ch])
        mmb = metric_value(summary, v, "mmbench", "circular_accuracy")
        mmb = metric_value(summary, v, "mmbench", "accuracy") if mmb is None else mmb
        rows.append({"variant": v, "model": model, "method": "full" if v == "dense" else method,
                     "hsr": v == "realigned", "safebench_asr": sb, "ch3ef_asr": ch, "avg_asr": avg[v],
                     "rsr_percent": None, "mmbench": mmb, "docvqa": metric_value(summary, v, "docvqa", "anls"),
                     "restored_ratio_permyriad": ratio if v == "realigned" else None, "status": st["status"]})
    for r in rows:
        if r["variant"] == "realigned":
            r["rsr_percent"] = rsr(avg.get("pruned"), avg.get("realigned"), avg.get("dense"))
    return pd.DataFrame(rows, columns=["variant", *COLUMNS, "status"])


def side_by_side(ours: pd.DataFrame, method: str) -> pd.DataFrame:
    """This run's table above the paper's rows for the same pruning method, with a ``source`` column."""
    a = ours.drop(columns=["status"]).assign(source="this run")
    b = paper_rows(method).assign(source="paper")
    b["variant"] = ["dense" if m == "full" else "realigned" if h else "pruned" for m, h in zip(b["method"], b["hsr"])]
    return pd.concat([a, b], ignore_index=True)[["source", "variant", *COLUMNS]]
