"""Figures of notebook 06 (seaborn): this run's safety and utility beside the paper's."""

from __future__ import annotations

import pandas as pd

from .benchmarks import BENCHMARKS
from .paper import paper_rows

VARIANT_ORDER = ["dense", "pruned", "realigned"]
PAPER_LABELS = {"safebench_asr": "SafeBench ASR", "ch3ef_asr": "Ch3Ef ASR", "mmbench": "MMBench", "docvqa": "DocVQA"}


def safety_long(metrics: pd.DataFrame, judge: str) -> pd.DataFrame:
    """ASR rows of this run's safety benchmarks (refusal ones by ``judge``; Ch3Ef by its choice)."""
    m = metrics[metrics["metric"] == "asr"]
    m = m[(m["judge"] == judge) | (m["judge"] == "choice")]
    return m.assign(benchmark=m["benchmark"].map(lambda b: BENCHMARKS[b].title))


def results_figure(metrics: pd.DataFrame, judge: str, method: str):
    """Three panels: this run's ASR by benchmark, its utility, and the paper's numbers for ``method``."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, axes = plt.subplots(1, 3, figsize=(15, 4), gridspec_kw={"width_ratios": [3, 2, 3]})
    safety = safety_long(metrics, judge)
    utility = metrics[metrics["metric"].isin(["accuracy", "anls"])]
    utility = utility.assign(benchmark=utility["benchmark"].map(lambda b: BENCHMARKS[b].title))
    paper = paper_rows(method)
    paper = paper.assign(variant=["dense" if m == "full" else "realigned" if h else "pruned"
                                  for m, h in zip(paper["method"], paper["hsr"])])
    paper = paper.melt(id_vars=["variant"], value_vars=["safebench_asr", "ch3ef_asr", "mmbench", "docvqa"],
                       var_name="benchmark", value_name="value").replace({"benchmark": PAPER_LABELS})
    palette = dict(zip(VARIANT_ORDER, sns.color_palette(n_colors=3)))
    panels = [(axes[0], safety, f"this run: ASR % (judge: {judge}; Ch3Ef: choice)"),
              (axes[1], utility, "this run: utility % (MMBench acc., DocVQA ANLS)"),
              (axes[2], paper, f"paper (Qwen2.5-VL, {method} 50%): ASR and utility %")]
    for ax, data, title in panels:
        if data.empty:
            ax.text(0.5, 0.5, "nothing evaluated", ha="center", va="center")
            ax.set_axis_off()
        else:
            order = [v for v in VARIANT_ORDER if v in set(data["variant"])]
            sns.barplot(data=data, x="benchmark", y="value", hue="variant", hue_order=order, palette=palette, ax=ax)
            ax.tick_params(axis="x", labelrotation=20)
            ax.set_ylim(0, 105)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("")
        ax.set_ylabel("%")
    fig.tight_layout()
    return fig
