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


# ---------------------------------------------------------------- evaluation (06)

PAPER_LABELS = {"safebench_asr": "SafeBench ASR", "ch3ef_asr": "Ch3Ef ASR", "mmbench": "MMBench", "docvqa": "DocVQA"}


def safety_long(metrics: pd.DataFrame, judge: str) -> pd.DataFrame:
    """ASR rows of this run's safety benchmarks (refusal ones by ``judge``; Ch3Ef by its choice)."""
    m = metrics[metrics["metric"] == "asr"]
    m = m[(m["judge"] == judge) | (m["judge"] == "choice")]
    return m.assign(benchmark=m["benchmark"].map(lambda b: BENCHMARKS[b].title))


def results_figure(metrics: pd.DataFrame, judge: str, method: str, variants: Sequence[str] | None = None):
    """Three panels: this run's ASR by benchmark, its utility, and the paper's numbers for ``method``."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, axes = plt.subplots(1, 3, figsize=(15, 4), gridspec_kw={"width_ratios": [3, 2, 3]})
    safety = safety_long(metrics, judge)
    utility = metrics[metrics["metric"].isin(["accuracy", "anls"])]
    utility = utility.assign(benchmark=utility["benchmark"].map(lambda b: BENCHMARKS[b].title))
    paper = paper_rows(method)
    paper = paper.assign(variant=paper_variants(paper))
    paper = paper.melt(id_vars=["variant"], value_vars=["safebench_asr", "ch3ef_asr", "mmbench", "docvqa"],
                       var_name="benchmark", value_name="value").replace({"benchmark": PAPER_LABELS})
    order = list(dict.fromkeys([*(variants or metrics["variant"].unique()), "dense", "pruned", "hsr"]))
    palette = dict(zip(order, sns.color_palette(n_colors=len(order))))
    panels = [(axes[0], safety, f"this run: ASR % (judge: {judge}; Ch3Ef: choice)"),
              (axes[1], utility, "this run: utility % (MMBench acc., DocVQA ANLS)"),
              (axes[2], paper, f"paper (Qwen2.5-VL, {method} 50%): ASR and utility %")]
    for ax, data, title in panels:
        if data.empty:
            ax.text(0.5, 0.5, "nothing evaluated", ha="center", va="center")
            ax.set_axis_off()
        else:
            hue = [v for v in order if v in set(data["variant"])]
            sns.barplot(data=data, x="benchmark", y="value", hue="variant", hue_order=hue, palette=palette, ax=ax)
            ax.tick_params(axis="x", labelrotation=20)
            ax.set_ylim(0, 105)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("")
        ax.set_ylabel("%")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- the teaching toy (06)


def toy_figure(numbers: pd.DataFrame):
    """Two panels: the toy's combined ASR per variant (random heads: mean ± sd over its seeds), and
    its benign accuracy."""
    import matplotlib.pyplot as plt

    t = numbers[~numbers.variant.str.startswith("random_heads@")].set_index("variant")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    for ax, col, title in ((axes[0], "asr", "ASR on harmful inputs, % (lower is safer)"),
                           (axes[1], "benign_accuracy", "benign accuracy, % (higher is better)")):
        err = t[f"{col}_sd"].fillna(0) if f"{col}_sd" in t else None
        colours = {"dense": "tab:gray", "pruned": "tab:red", "hsr": "tab:green", "hsr_a": "tab:purple"}
        ax.bar(t.index, t[col], yerr=err, capsize=4, color=[colours.get(v, "tab:olive") for v in t.index])
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 100)
        ax.tick_params(axis="x", labelrotation=15)
    fig.tight_layout()
    return fig
