"""Real data no one here made, vendored in ``hsr_lib/reference_data/`` (so Colab has it too): the
head scores the HSR authors released, and the paper's published tables and textual claims.
This module is their one owner."""

from __future__ import annotations

from pathlib import Path

from .ships import load_head_scores

REFERENCE_DATA = Path(__file__).resolve().parent / "reference_data"
AUTHORS_SCORES = {
    "llava-next-vicuna-7b": REFERENCE_DATA / "authors_head_scores" / "llava-next-vicuna-7b.jsonl",
    "llama3-llava-next-8b": REFERENCE_DATA / "authors_head_scores" / "llama3-llava-next-8b.jsonl",
}
PAPER_TABLES = {
    "main": REFERENCE_DATA / "paper" / "main_results_qwen2.5-vl.csv",
    "models_wanda50": REFERENCE_DATA / "paper" / "models_wanda50.csv",
    "sparsity_ablation": REFERENCE_DATA / "paper" / "sparsity_ablation_qwen2-vl_wanda.csv",
    "claims": REFERENCE_DATA / "paper" / "claims.csv",
}


def authors_scores(name: str) -> dict[str, float]:
    """The head scores the authors released: 'llava-next-vicuna-7b' or 'llama3-llava-next-8b'."""
    if name not in AUTHORS_SCORES:
        raise KeyError(f"unknown released scores {name!r}; available: {', '.join(AUTHORS_SCORES)}")
    return load_head_scores(AUTHORS_SCORES[name])


def paper_table(name: str):
    """One of the paper's published tables as a DataFrame: 'main', 'models_wanda50',
    'sparsity_ablation' or 'claims' (the textual findings, one row each)."""
    import pandas as pd

    if name not in PAPER_TABLES:
        raise KeyError(f"unknown paper table {name!r}; tables: {', '.join(PAPER_TABLES)}")
    return pd.read_csv(PAPER_TABLES[name])


def claim(name: str) -> float:
    """A number the paper states in its text (``claims.csv``), e.g.
    'spearman_total_ships_vs_safety_degradation_six_models'."""
    t = paper_table("claims")
    row = t[t["claim"] == name]
    if row.empty:
        raise KeyError(f"unknown claim {name!r}; claims: {', '.join(t['claim'])}")
    return float(row["value"].iloc[0])
