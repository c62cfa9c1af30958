"""Notebook 06's views on any subset of variants and benchmarks: one colour per variant, the toy's
figure and headline table, the significance table (hand-made scores, no model)."""

from __future__ import annotations

import itertools

import matplotlib
import pandas as pd
import pytest

from hsr_lib import views
from hsr_lib.evaluate import comparisons as C
from hsr_lib.evaluate.metrics import summarize

matplotlib.use("Agg")
TOY = ["toy_harmful", "toy_harmful_novel", "toy_unsafe_image", "toy_benign"]
ALL = ["dense", "pruned", "hsr", "hsr_a", "random_heads@0", "random_heads@1"]


def _scores(benchmarks, variants):
    rows = []
    for b, v in itertools.product(benchmarks, variants):
        for i in range(6):
            x = float((i + len(v)) % 3 == 0)
            if b == "toy_benign":
                rows += [{"variant": v, "benchmark": b, "item_id": f"{b}{i}", "metric": "correct", "judge": "",
                          "value": 1 - x}, {"variant": v, "benchmark": b, "item_id": f"{b}{i}", "metric": "refused",
                                            "judge": "vlguard", "value": x}]
            else:
                rows.append({"variant": v, "benchmark": b, "item_id": f"{b}{i}", "metric": "attack_success",
                             "judge": "vlguard", "value": x})
    return pd.DataFrame(rows)


def _metrics(benchmarks, variants):
    s = _scores(benchmarks, variants)
    return pd.concat([summarize(s), C.combined_rows(s, benchmarks, variants, "vlguard", "vlguard", B=50)],
                     ignore_index=True), C.paired_tests(s, benchmarks, variants, "vlguard", "vlguard", B=50)


@pytest.mark.parametrize("benchmarks, variants", [
    (["toy_unsafe_image"], ALL), (["toy_benign"], ["dense", "hsr"]), (["toy_harmful", "toy_benign"], ["pruned", "hsr_a"]),
])
def test_views_work_on_any_subset(benchmarks, variants):
    import matplotlib.pyplot as plt

    M, tests = _metrics(benchmarks, variants)
    fig = views.toy_figure(M, "vlguard", variants)
    drawn = [p for ax in fig.axes for p in ax.patches]
    assert {p.get_facecolor()[:3] for p in drawn} <= {matplotlib.colors.to_rgb(views.VARIANT_COLORS[v]) for v in variants}
    plt.close(fig)
    head = views.beside_paper(M, "wanda", variants)
    ours = head[head.source == "this run"]
    assert list(ours.variant) == variants and list(head[head.source == "paper"].variant) == ["dense", "pruned", "hsr"]
    if "toy_benign" in benchmarks:
        assert set(ours.utility_is) == {"toy: benign accuracy"} and ours.over_refusal.notna().all()
    sig = views.significance_table(tests)
    assert set(zip(sig["comparison"], sig["measure"])) == set(zip(tests["comparison"], tests["metric"]))
    combined = tests[tests.benchmark == "combined"]
    assert len(sig) == len(combined) + len(tests[~tests.metric.isin(combined.metric)])  # combined where there is one


def test_one_colour_per_variant_everywhere():
    colours = [views.VARIANT_COLORS[v] for v in ALL]
    assert len(set(colours)) == len(colours)
    assert views.VARIANT_COLORS.get("hsr") == views.VARIANT_COLORS["hsr"] == "#2ca02c"
    assert views.VARIANT_COLORS["random_heads@3"] == views.VARIANT_COLORS.get("random_heads@3")
    assert views.palette(["pruned", "random_heads@1"]) == {"pruned": "#d62728", "random_heads@1": colours[-1]}


def test_the_legend_sits_outside_every_panel():
    import matplotlib.pyplot as plt

    M, _ = _metrics(TOY, ALL)
    fig = views.toy_figure(M, "vlguard", ALL)
    assert all(ax.get_legend() is None for ax in fig.axes)  # the toy figure's x axis names the variants
    plt.close(fig)
    fig = views.results_figure(M, "vlguard", "wanda", ALL)
    fig.canvas.draw()
    legend = fig.legends[0].get_window_extent()
    for ax in fig.axes:
        assert not legend.overlaps(ax.get_window_extent()), ax.get_title()
    plt.close(fig)
