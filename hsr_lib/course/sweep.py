"""Exercise 5's check: a small sweep of the toy through the library (one realignment setting varied)
and the table of what it did to the ASR. The computed part is checked against the same sweep run
by the library; the prediction and the explanation are for the teacher to read."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from .feedback import call, fail, passed
from .toy import evaluate, toy_run

COLUMNS = ("value", "asr_dense", "asr_pruned", "asr_hsr", "restored_permyriad")


def reference_sweep(key: str, values: Sequence, runs_dir: str | Path | None = None) -> pd.DataFrame:
    """One row per value of ``key``: the toy's combined ASR (dense, pruned, hsr; %) and the restored ratio (‱)."""
    from .. import steps
    from ..toy_study import numbers

    rows = []
    for v in values:
        run = toy_run(runs_dir, **{key: v})
        t = numbers(evaluate(run).metrics).set_index("variant")["asr"]
        rows.append({"value": v, "asr_dense": t["dense"], "asr_pruned": t["pruned"], "asr_hsr": t["hsr"],
                     "restored_permyriad": steps.realign.run(run, progress=False).summary["restored_ratio_permyriad"]})
    return pd.DataFrame(rows, columns=list(COLUMNS))


def check_sweep(your_fn: Callable, key: str, values: Sequence, runs_dir: str | Path | None = None) -> pd.DataFrame:
    """``your_fn(key, values, runs_dir) -> DataFrame`` with columns ``value, asr_dense, asr_pruned,
    asr_hsr, restored_permyriad`` (one row per value, in order), against the library's sweep.
    Returns your table."""
    got = call(your_fn, key, list(values), runs_dir, name="sweep")
    if not isinstance(got, pd.DataFrame):
        fail(f"sweep returned a {type(got).__name__}; expected a pandas DataFrame with columns {list(COLUMNS)}")
    missing = [c for c in COLUMNS if c not in got.columns]
    if missing:
        fail(f"sweep's table lacks the column(s) {missing}; expected {list(COLUMNS)}")
    if len(got) != len(values):
        fail(f"sweep's table has {len(got)} rows; expected one per value ({len(values)})")
    want = reference_sweep(key, values, runs_dir)
    if [float(v) for v in got["value"]] != [float(v) for v in values]:
        fail(f"sweep's column value is {list(got['value'])}; expected the values in the order given, {list(values)}")
    for i, v in enumerate(values):
        for col in COLUMNS[1:]:
            g, w = float(got[col].iloc[i]), float(want[col].iloc[i])
            if abs(g - w) > 1e-6 * max(1.0, abs(w)):
                why = ""
                flat = got[col].nunique() == 1 and want[col].nunique() > 1
                if flat:
                    why = (f" Your {col} is the same for every value: the setting did not reach the run; pass it as "
                           f"an override, toy_run(runs_dir, **{{{key!r}: value}}).")
                elif col == "asr_hsr" and abs(g - float(want["asr_pruned"].iloc[i])) < 1e-6:
                    why = " That is the pruned model's ASR; take the row of the variant 'hsr'."
                elif col == "asr_hsr" and abs(g - float(want["asr_dense"].iloc[i])) < 1e-6:
                    why = " That is the dense model's ASR; take the row of the variant 'hsr'."
                elif col.startswith("asr") and 0 <= g <= 1 and abs(100 * g - w) < 1e-6:
                    why = " ASR is in %, as the library reports it."
                fail(f"sweep, row {i} ({key} = {v}): {col} expected {w:.4g}, got {g:.4g}.{why}")
    passed(f"sweep over {key} = {list(values)} matches the library's")
    return got
