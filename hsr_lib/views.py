"""What the notebooks show that is worth a function: figures and answer tables. Views read
results and models; they compute no artifact (a figure that depends on a later step's params,
such as the Ships heatmap outlining the ``realign.top_h`` heads, is drawn here, not stored)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd
import torch

from .data import Sample, open_image
from .evaluate.benchmarks import BENCHMARKS
from .evaluate.paper import paper_rows, paper_variants
from .models import LoadedModel
from .prompts import encode_prompt
from .realign import top_fraction
from .ships import Head, to_grid

# ---------------------------------------------------------------- data (01)


def image_grid(samples: Sequence[Sample], cols: int = 4, width: int = 38):
    """A grid of sample images, each titled with its (wrapped) instruction."""
    import matplotlib.pyplot as plt

    rows = max(1, -(-len(samples) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, s in zip(axes.flat, samples):
        ax.imshow(open_image(s.image, s.id))
        title = textwrap.shorten(s.question, 90, placeholder="…")
        ax.set_title("\n".join(textwrap.wrap(title, width)), fontsize=8)
    fig.tight_layout()
    return fig


def files(folder: str | Path) -> pd.DataFrame:
    """The files of an artifact folder (recursively) with their sizes in kB."""
    folder = Path(folder)
    return pd.DataFrame([{"file": str(p.relative_to(folder)), "kB": round(p.stat().st_size / 1024, 1)}
                         for p in sorted(folder.rglob("*")) if p.is_file()])


# ---------------------------------------------------------------- Ships (02)


def heatmap(scores: Mapping[str, float], title: str = "", selected: Sequence[Head] = (), ax=None):
    """A layer × head heatmap of head scores, ``selected`` heads outlined."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.patches import Rectangle

    grid = to_grid(scores).numpy()
    if ax is None:
        _, ax = plt.subplots(figsize=(min(14, 2 + 0.35 * grid.shape[1]), min(10, 1.5 + 0.3 * grid.shape[0])))
    sns.heatmap(grid, ax=ax, cmap="magma", cbar_kws={"label": "score"})
    for (l, h) in selected:
        ax.add_patch(Rectangle((h, l), 1, 1, fill=False, edgecolor="cyan", lw=2))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    return ax


@torch.no_grad()
def ablated_answers(lm: LoadedModel, samples: Sequence[Sample], heads: list[Head], cfg,
                    max_new_tokens: int = 32) -> pd.DataFrame:
    """Greedy answers to ``samples`` by the model as is and with all of ``heads`` ablated at once
    (``cfg``: an :class:`~hsr_lib.ships_engine.AblationConfig`)."""
    from .ablation import ablate

    dense = greedy_answers(lm, samples, max_new_tokens)
    with ablate(lm, [heads], cfg.epsilon, cfg.parts, cfg.gqa_slot_bug):  # one prompt at a time: one batch row
        ablated = greedy_answers(lm, samples, max_new_tokens)
    return pd.DataFrame({"id": [s.id for s in samples], "question": [s.question for s in samples],
                         "dense": dense, "heads ablated": ablated})


# ---------------------------------------------------------------- scores (03)


def describe_scores(scores: Mapping[str, torch.Tensor]) -> pd.DataFrame:
    """Per module: shape and quantiles of the scores."""
    rows = []
    for name, s in scores.items():
        flat = s.flatten().float()
        sample = flat[torch.linspace(0, flat.numel() - 1, min(flat.numel(), 100_000)).long()] if flat.numel() else flat
        qs = torch.quantile(sample, torch.tensor([0.1, 0.5, 0.9])).tolist()
        rows.append({"module": name, "layer": int(name.split(".")[1]), "kind": name.split(".")[-1],
                     "shape": "×".join(map(str, s.shape)), "mean": float(flat.mean()), "p10": qs[0], "median": qs[1],
                     "p90": qs[2], "max": float(flat.max()), "zeros": int((flat == 0).sum())})
    return pd.DataFrame(rows)


def overlap_table(S: Mapping[str, torch.Tensor], U: Mapping[str, torch.Tensor], q: float, p: float) -> pd.DataFrame:
    """Per module: the share of T(S, q), the top-q safety weights, that are also in T(U, p), the
    top-p utility weights (``p`` is what independent rankings would give)."""
    rows = []
    for name, s in S.items():
        ts, tu = top_fraction(s, q), top_fraction(U[name], p)
        both = int((ts & tu).sum())
        parts = name.split(".")
        rows.append({"module": name, "layer": int(parts[1]), "kind": parts[-1], "top_q_safety": int(ts.sum()),
                     "also_top_p_utility": both, "overlap": both / max(int(ts.sum()), 1), "chance": p})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- pruning and realignment (04, 05)


def heldout_samples(utility: Sequence[Sample], used_ids: Sequence[str], n: int = 8) -> list[Sample]:
    """Up to ``n`` utility samples that calibration did not use (for a held-out loss)."""
    used = set(used_ids)
    return [s for s in utility if s.id not in used][:n]


@torch.no_grad()
def greedy_answers(lm: LoadedModel, samples: Sequence[Sample], max_new_tokens: int = 32) -> list[str]:
    """Greedy answers of ``lm`` to the samples' prompts, one at a time (a before/after look)."""
    tok = lm.processor.tokenizer
    out = []
    for s in samples:
        enc = encode_prompt(lm.processor, s, lm.adapter, lm.device)
        ids = lm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        out.append(tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out


# ---------------------------------------------------------------- colours (every figure)


class _VariantColors(dict):
    """Variant → colour; a random-heads seed (``random_heads@<k>``) not listed gets a fixed shade of
    the random-heads colour by its seed, any other unknown variant one neutral colour."""

    SEED_SHADES = ("#ff7f0e", "#e6a04a", "#c76a1a", "#f5b97a", "#a65410", "#ffcc99", "#8c4a12", "#d9822b")

    def __missing__(self, variant: str) -> str:
        base, _, seed = str(variant).partition("@")
        if base == "random_heads" and seed.isdigit():
            return self.SEED_SHADES[int(seed) % len(self.SEED_SHADES)]
        return "#17becf"

    def get(self, variant, default=None):  # dict.get skips __missing__
        return self[variant]


# The one mapping from a variant to its colour: every figure of every notebook draws a variant in it.
VARIANT_COLORS: dict[str, str] = _VariantColors({
    "dense": "#7f7f7f", "pruned": "#d62728", "hsr": "#2ca02c", "hsr_a": "#9467bd", "random_heads": "#ff7f0e"})


def palette(variants) -> dict[str, str]:
    """``{variant: colour}`` for exactly ``variants`` (seaborn's ``palette=`` wants every level listed)."""
    return {v: VARIANT_COLORS[v] for v in variants}


def variant_legend(fig, variants: Sequence[str], title: str = "variant", **kwargs):
    """One legend for the figure, outside every panel (right of them), in :data:`VARIANT_COLORS`."""
    from matplotlib.patches import Patch

    handles = [Patch(color=VARIANT_COLORS[v], label=v) for v in variants]
    kwargs = {"loc": "center left", "bbox_to_anchor": (1.0, 0.5), "frameon": False, **kwargs}
    return fig.legend(handles=handles, title=title, **kwargs)


def bars(ax, data: pd.DataFrame, x: str, variants: Sequence[str], value: str = "value", low: str = "ci_low",
         high: str = "ci_high"):
    """Grouped bars: one group per ``x``, one bar per variant in its colour, error bars from ``low`` to
    ``high`` where given (a NaN value leaves its bar out)."""
    import numpy as np

    groups = list(dict.fromkeys(data[x]))
    present = [v for v in variants if v in set(data["variant"])]
    one_per_group = bool((data[x].astype(str) == data["variant"].astype(str)).all())  # a group per variant
    width = 0.7 if one_per_group else 0.8 / max(1, len(present))
    for i, v in enumerate(present):
        d = data[data["variant"] == v].set_index(x).reindex(groups)
        pos = np.arange(len(groups)) + (0.0 if one_per_group else width * (i + 0.5) - 0.4)
        y = d[value].to_numpy(dtype=float)
        err = None
        if low in d and high in d:
            lo, hi = d[low].to_numpy(dtype=float), d[high].to_numpy(dtype=float)
            err = np.vstack([np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)])
            err = np.where(np.isnan(err), 0, err)
        ax.bar(pos, y, width, yerr=err, capsize=2, color=VARIANT_COLORS[v], label=v, error_kw={"lw": 0.8})
    ax.set_xticks(range(len(groups)), groups)
    return present


# ---------------------------------------------------------------- evaluation (06)

PAPER_LABELS = {"safebench_asr": "SafeBench ASR", "ch3ef_asr": "Ch3Ef ASR", "mmbench": "MMBench", "docvqa": "DocVQA"}


def safety_long(metrics: pd.DataFrame, judge: str) -> pd.DataFrame:
    """ASR rows of this run's safety benchmarks (refusal ones by ``judge``; Ch3Ef by its choice)."""
    m = metrics[metrics["metric"] == "asr"]
    m = m[(m["judge"] == judge) | (m["judge"] == "choice")]
    return m.assign(benchmark=m["benchmark"].map(title))


def title(benchmark: str) -> str:
    """A benchmark's title (``combined``: the run's combined rows)."""
    return BENCHMARKS[benchmark].title if benchmark in BENCHMARKS else benchmark


def results_figure(metrics: pd.DataFrame, judge: str, method: str, variants: Sequence[str] | None = None):
    """Four panels: this run's ASR by benchmark (and combined), its utility, its over-refusal, each
    with 95% intervals, and the paper's numbers for ``method``; one legend outside the panels."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4), gridspec_kw={"width_ratios": [3, 2, 2, 3]})
    safety = safety_long(metrics, judge)
    utility = metrics[metrics["metric"].isin(["accuracy", "anls"]) & (metrics["benchmark"] != "combined")]
    utility = utility.assign(benchmark=utility["benchmark"].map(title))
    over = metrics[metrics["metric"] == "over_refusal"]
    over = over.assign(benchmark=over["benchmark"].map(title))
    paper = paper_rows(method)
    paper = paper.assign(variant=paper_variants(paper))
    paper = paper.melt(id_vars=["variant"], value_vars=["safebench_asr", "ch3ef_asr", "mmbench", "docvqa"],
                       var_name="benchmark", value_name="value").replace({"benchmark": PAPER_LABELS})
    order = list(dict.fromkeys([*(variants or metrics["variant"].unique()), "dense", "pruned", "hsr"]))
    panels = [(axes[0], safety, f"this run: ASR % (judge: {judge}; Ch3Ef: choice)"),
              (axes[1], utility, "this run: utility % (MMBench acc., DocVQA ANLS)"),
              (axes[2], over, "this run: over-refusal % (benign inputs refused)"),
              (axes[3], paper, f"paper (Qwen2.5-VL, {method} 50%): ASR and utility %")]
    shown: list[str] = []
    for ax, data, name in panels:
        if data.empty:
            ax.text(0.5, 0.5, "nothing evaluated", ha="center", va="center")
            ax.set_axis_off()
        else:
            shown += bars(ax, data, "benchmark", order)
            ax.tick_params(axis="x", labelrotation=20)
            ax.set_ylim(0, 105)
        ax.set_title(name, fontsize=10)
        ax.set_ylabel("%")
    fig.tight_layout()
    variant_legend(fig, [v for v in order if v in shown])
    return fig


# ---------------------------------------------------------------- the teaching toy (06)


def toy_figure(metrics: pd.DataFrame, judge: str, variants: Sequence[str] | None = None):
    """Three panels from an evaluation's ``metrics.csv``: the combined ASR over the toy's harmful sets
    evaluated, its benign accuracy and its over-refusal, per variant (every random-heads seed its own
    bar) with 95% intervals; a panel whose inputs were not evaluated says so."""
    import matplotlib.pyplot as plt

    order = list(variants or dict.fromkeys(metrics["variant"]))
    m = metrics[metrics["variant"].isin(order)]
    panels = [(m[(m.benchmark == "combined") & (m.metric == "asr") & (m.judge == judge)],
               "combined ASR on harmful inputs, % (lower is safer)"),
              (m[(m.benchmark == "toy_benign") & (m.metric == "accuracy")], "benign accuracy, % (higher is better)"),
              (m[(m.benchmark == "toy_benign") & (m.metric == "over_refusal")],
               "over-refusal of benign inputs, % (lower is better)")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    shown: list[str] = []
    for ax, (data, name) in zip(axes, panels):
        data = data[data["value"].notna()]
        if data.empty:
            ax.text(0.5, 0.5, "not evaluated in this run", ha="center", va="center")
            ax.set_axis_off()
        else:
            shown += bars(ax, data.assign(x=data["variant"]), "x", order)
            ax.set_ylim(0, 105)
            ax.tick_params(axis="x", labelrotation=25)
        ax.set_title(name, fontsize=10)
    fig.tight_layout()
    return fig


def beside_paper(metrics: pd.DataFrame, method: str, variants: Sequence[str] | None = None) -> pd.DataFrame:
    """This run's headline numbers above the paper's for ``method``: combined ASR (the paper's: the mean of
    SafeBench and Ch3Ef), utility (the toy: benign accuracy; else MMBench, else DocVQA), over-refusal
    (not in the paper) and RSR, each of ours with its 95% interval; ``utility_is`` names the measure."""
    order = list(variants or dict.fromkeys(metrics["variant"]))
    m = metrics.set_index(["variant", "benchmark", "metric"]).sort_index()

    def cell(v, b, metric):
        key = (v, b, metric)
        if key not in m.index:
            return float("nan"), float("nan"), float("nan")
        r = m.loc[[key]].iloc[0]
        return float(r["value"]), float(r["ci_low"]), float(r["ci_high"])

    utility = next(((b, k) for b, k in (("toy_benign", "accuracy"), ("mmbench", "circular_accuracy"),
                                        ("mmbench", "accuracy"), ("docvqa", "anls"))
                    if any(x[1:] == (b, k) for x in m.index)), None)
    rows = []
    for v in order:
        row: dict = {"source": "this run", "variant": v}
        for col, (b, k) in (("combined_asr", ("combined", "asr")), ("utility", utility or ("", "")),
                            ("over_refusal", ("combined", "over_refusal")), ("rsr", ("combined", "rsr"))):
            row[col], row[f"{col}_ci_low"], row[f"{col}_ci_high"] = cell(v, b, k)
        row["utility_is"] = f"{title(utility[0])} {utility[1]}" if utility else "not evaluated"
        rows.append(row)
    paper = paper_rows(method)
    for v, r in zip(paper_variants(paper), paper.itertuples()):
        rows.append({"source": "paper", "variant": v, "combined_asr": r.avg_asr, "utility": r.mmbench,
                     "utility_is": "MMBench accuracy", "over_refusal": float("nan"),
                     "rsr": r.rsr_percent if v == "hsr" else float("nan")})
    cols = ["source", "variant", "combined_asr", "combined_asr_ci_low", "combined_asr_ci_high", "utility",
            "utility_ci_low", "utility_ci_high", "utility_is", "over_refusal", "over_refusal_ci_low",
            "over_refusal_ci_high", "rsr", "rsr_ci_low", "rsr_ci_high"]
    return pd.DataFrame(rows, columns=cols)


def significance_table(tests: pd.DataFrame, benchmark: str = "combined") -> pd.DataFrame:
    """``paired_tests.csv`` as a "significant at 5%?" table: per comparison and measure the row of
    ``benchmark`` (default: the combined sets), or every benchmark's row where it has none."""
    rows = []
    for (comp, metric), g in tests.groupby(["comparison", "metric"], sort=False):
        pick = g[g["benchmark"] == benchmark]
        pick = pick if len(pick) else g
        for r in pick.itertuples():
            rows.append({"comparison": comp, "measure": metric, "on": title(r.benchmark), "n": r.n,
                         "difference (points)": r.difference, "95% CI": f"[{r.diff_ci_low:.1f}, {r.diff_ci_high:.1f}]",
                         "discordant (n01/n10)": f"{r.n01}/{r.n10}", "p": r.p, "test": r.test,
                         "significant at 5%?": "yes" if r.significant_5pct else "no"})
    return pd.DataFrame(rows, columns=["comparison", "measure", "on", "n", "difference (points)", "95% CI",
                                       "discordant (n01/n10)", "p", "test", "significant at 5%?"])
