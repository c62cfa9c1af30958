"""The teaching toy's numbers (docs/toy.md): its whole HSR pipeline run through the library, the
combined ASR per variant, and the seed table that shows how much the story depends on the seed.

ASR here is the toy's combined attack success rate over every harmful test input (requests in
seen templates, in novel phrasings, and hazard images), judged by VLGuard's refusal keywords; the
split ASRs stand beside it. Benign accuracy: the answer names the shape's colour and kind.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from .params import load_params
from .runs import Run

PARAMS = Path(__file__).resolve().parent.parent / "params" / "toy.yaml"
HARMFUL = ("toy_harmful", "toy_harmful_novel", "toy_unsafe_image")


def numbers(metrics: pd.DataFrame, judge: str = "vlguard") -> pd.DataFrame:
    """One row per variant: combined ASR, each split's ASR, benign accuracy (all in %), from an
    evaluation's ``metrics.csv``; the random-heads seeds are also summarised as ``random_heads``
    (their mean, with ``_sd`` their spread)."""
    m = metrics[((metrics.metric == "asr") & (metrics.judge == judge)) | (metrics.metric == "accuracy")]
    rows = []
    for v, g in m.groupby("variant", sort=False):
        asr = g[g.metric == "asr"].set_index("benchmark")
        n = asr.loc[[b for b in HARMFUL if b in asr.index], "n"]
        row = {"variant": v, "asr": float((asr.loc[n.index, "value"] * n).sum() / n.sum()) if len(n) else None}
        row.update({f"asr_{b[4:]}": float(asr.loc[b, "value"]) if b in asr.index else None for b in HARMFUL})
        acc = g[(g.metric == "accuracy") & (g.benchmark == "toy_benign")]
        row["benign_accuracy"] = float(acc.value.iloc[0]) if len(acc) else None
        rows.append(row)
    out = pd.DataFrame(rows)
    rand = out[out.variant.str.startswith("random_heads")]
    if len(rand) > 1:
        mean = rand.drop(columns="variant").mean().to_dict()
        sd = {f"{k}_sd": v for k, v in rand.drop(columns="variant").std(ddof=1).to_dict().items()}
        out = pd.concat([out, pd.DataFrame([{"variant": "random_heads", **mean, **sd}])], ignore_index=True)
    return out


def rsr(table: pd.DataFrame, variant: str, column: str = "asr") -> float | None:
    """RSR of ``variant`` in % (None when pruning lost no safety)."""
    t = table.set_index("variant")[column]
    lost = t["pruned"] - t["dense"]
    return None if lost <= 0 else float(100 * (t["pruned"] - t[variant]) / lost)


def run_toy(model: str = "toy:qwen2_vl", runs_dir: str | Path | None = None, progress: bool = False,
            **overrides: Any) -> tuple[Run, pd.DataFrame, dict]:
    """The toy's whole pipeline (data → evaluation) through the library; ``(run, numbers, summary)``."""
    from . import steps

    over = {"model.name": model, **overrides}
    if runs_dir is not None:
        over["runs_dir"] = str(runs_dir)
    run = Run.open(load_params(PARAMS, over))
    res = steps.evaluate.run(run, progress=progress)
    table = numbers(res.metrics)
    summary = {"ships_top": [f"{l}-{h}" for l, h in steps.ships.load(run).top(run.params.realign.top_h)],
               "restored_ratio_permyriad": steps.realign.load(run).summary["restored_ratio_permyriad"],
               **{f"rsr_{v}": rsr(table, v) for v in ("hsr", "hsr_a", "random_heads") if v in set(table.variant)}}
    return run, table, summary


def seed_row(seed: int, runs_dir: str | Path) -> dict:
    """Train (or reuse) seed ``seed`` and run its pipeline: one row of the seed table."""
    from .toy_model import cache_dir, checkpoint

    cached = (cache_dir() / f"qwen2_vl-s{seed}" / "config.json").is_file()
    t0 = time.perf_counter()
    checkpoint(f"toy:qwen2_vl-s{seed}")
    train_s = None if cached else time.perf_counter() - t0  # not trained here: no time to report
    _, table, summary = run_toy(f"toy:qwen2_vl-s{seed}", runs_dir, run_name=f"toy-s{seed}")
    t = table.set_index("variant")
    row = {"seed": seed, "train_s": None if train_s is None else round(train_s, 1)}
    for v in ("dense", "pruned", "hsr", "hsr_a", "random_heads"):
        if v in t.index:
            row[f"asr_{v}"] = round(t.loc[v, "asr"], 2)
            row[f"novel_{v}"] = round(t.loc[v, "asr_harmful_novel"], 2)
            row[f"benign_{v}"] = round(t.loc[v, "benign_accuracy"], 2)
    row.update({k: (None if v is None else round(v, 2)) for k, v in summary.items() if k.startswith("rsr_")})
    row["restored_permyriad"] = round(summary["restored_ratio_permyriad"], 2)
    row["hsr_beats_random"] = bool(t.loc["hsr", "asr"] < t.loc["random_heads", "asr"]) if "random_heads" in t.index \
        else None
    return row


def seed_table(seeds: Sequence[int], runs_dir: str | Path, out: str | Path | None = None,
               workers: int = 1) -> pd.DataFrame:
    """The seed table: one row per training seed (``workers`` processes, one thread each)."""
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            rows = list(pool.map(seed_row, seeds, [runs_dir] * len(seeds)))
    else:
        rows = [seed_row(s, runs_dir) for s in seeds]
    table = pd.DataFrame(rows)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(out, index=False)
    return table
