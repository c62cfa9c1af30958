"""The Ships step (notebook 02): score every head on the run's harmful prompts, persist each
layer as it finishes (a killed run resumes there), and write the artifacts:

``ships/head_scores.json``  the chosen score in the authors' one-line format
``ships/head_scores.csv``   layer, head, score, rank, and all three variants
``ships/heatmap.png``       layer × head heatmap, top heads outlined
``ships/summary.json``      score variant, prompts, totals, wall time
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .datastep import prepare_data
from .io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json
from .models import load_model
from .prompts import encode_prompt
from .runs import Run
from .ships import Head, dumps_authors, heatmap, load_head_scores, ordered, select_heads, table
from .ships_engine import AblationConfig, LayerScores, ships_engine

REFERENCE_DATA = Path(__file__).resolve().parent / "reference_data"
AUTHORS_SCORES = {
    "llava-next-vicuna-7b": REFERENCE_DATA / "authors_head_scores" / "llava-next-vicuna-7b.jsonl",
    "llama3-llava-next-8b": REFERENCE_DATA / "authors_head_scores" / "llama3-llava-next-8b.jsonl",
}


@dataclass
class ShipsResult:
    """Scores of a run: ``scores`` is the chosen variant, ``all`` every variant."""

    dir: Path
    score: str
    all: LayerScores
    summary: dict

    @property
    def scores(self) -> dict[str, float]:
        return self.all[self.score]

    def top(self, top_h: int) -> list[Head]:
        return select_heads(self.scores, top_h)

    def table(self):
        return table(self.scores, self.all)


def load_ships(run: Run) -> ShipsResult:
    """The finished Ships artifacts of ``run``."""
    d = run.step_dir("ships")
    if not run.recorded("ships"):
        raise FileNotFoundError(f"{d}: the Ships step has not finished; run notebook 02 (or run_ships) first")
    summary = read_json(d / "summary.json")
    return ShipsResult(d, summary["score"], read_json(d / "head_scores_all.json"), summary)


def _resumable(layer_dir: Path, fingerprint: str) -> dict[int, LayerScores]:
    """Per-layer results saved by an interrupted run with the same fingerprint."""
    done = {}
    for f in sorted(layer_dir.glob("layer_*.json")):
        rec = read_json(f)
        if rec.get("fingerprint") == fingerprint:
            done[rec["layer"]] = rec["scores"]
    return done


def run_ships(run: Run, progress: bool = True) -> ShipsResult:
    """Compute (or reuse) the Ships scores of ``run``."""
    P = run.params
    sets = prepare_data(run)  # cached; its fingerprint feeds this step's
    if run.is_done("ships"):
        return load_ships(run)
    fp = run.fingerprint("ships")
    samples = sets.load("ships_safety")
    lm = load_model(P.model.name, P.model.family, P.ships.dtype, P.model.device, P.model.attn_implementation,
                    seed=P.seed)
    prompts = [encode_prompt(lm.processor, s, lm.adapter, lm.device) for s in samples]
    layer_dir = run.step_dir("ships") / "layers"
    done = _resumable(layer_dir, fp)
    if done and progress:
        print(f"resuming: {len(done)} of {lm.geometry.n_layers} layers already scored")

    def save(layer: int, scores: LayerScores) -> None:
        atomic_write_json(layer_dir / f"layer_{layer:03d}.json", {"layer": layer, "fingerprint": fp, "scores": scores})

    with run.step("ships") as out:
        scores = ships_engine(lm, prompts, AblationConfig.from_params(P), P.ships.batch_heads, done, save, progress)
        chosen = scores[P.ships.score]
        atomic_write_text(out / "head_scores.json", dumps_authors(chosen) + "\n")
        atomic_write_json(out / "head_scores_all.json", {k: ordered(v) for k, v in scores.items()})
        atomic_write_text(out / "head_scores.csv", table(chosen, scores).to_csv(index=False))
        summary = {"score": P.ships.score, "fidelity": P.fidelity, "n_prompts": len(prompts),
                   "layers": lm.geometry.n_layers, "heads": lm.geometry.n_heads,
                   "total": {k: sum(v.values()) for k, v in scores.items()},
                   "epsilon": P.ships.epsilon, "parts": list(P.ships.parts), "gqa_slot_bug": P.ships.gqa_slot_bug}
        atomic_write_json(out / "summary.json", summary)
        _save_heatmap(out / "heatmap.png", chosen, f"Ships ({P.ships.score}), {P.model.name}",
                      select_heads(chosen, min(P.realign.top_h, len(chosen))))
    return ShipsResult(out, P.ships.score, {k: ordered(v) for k, v in scores.items()}, summary)


def _save_heatmap(path: Path, scores: dict[str, float], title: str, selected: list[Head]) -> None:
    """Render without pyplot, so a notebook's inline figures are left alone."""
    import io

    from matplotlib.figure import Figure

    grid_shape = (len({k.split("-")[0] for k in scores}), len({k.split("-")[1] for k in scores}))
    fig = Figure(figsize=(min(14, 2 + 0.35 * grid_shape[1]), min(10, 1.5 + 0.3 * grid_shape[0])))
    heatmap(scores, title, selected, ax=fig.add_subplot())
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def authors_scores(name: str) -> dict[str, float]:
    """The head scores the authors released: 'llava-next-vicuna-7b' or 'llama3-llava-next-8b'."""
    if name not in AUTHORS_SCORES:
        raise KeyError(f"unknown released scores {name!r}; available: {', '.join(AUTHORS_SCORES)}")
    return load_head_scores(AUTHORS_SCORES[name])


def ablated_answers(lm, samples, heads: list[Head], cfg: AblationConfig, max_new_tokens: int = 32) -> list[dict]:
    """Greedy answers to ``samples`` by the model as is and with all of ``heads`` ablated at once."""
    from contextlib import nullcontext

    import torch

    from .ablation import ablate

    rows = []
    for s in samples:
        enc = encode_prompt(lm.processor, s, lm.adapter, lm.device)
        n = enc["input_ids"].shape[1]
        answers = {}
        for label, ctx in (("dense", None), ("heads ablated", heads)):
            with torch.no_grad(), (ablate(lm, [ctx], cfg.epsilon, cfg.parts, cfg.gqa_slot_bug) if ctx else nullcontext()):
                out = lm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
            answers[label] = lm.processor.tokenizer.decode(out[0, n:], skip_special_tokens=True).strip()
        rows.append({"id": s.id, "question": s.question, **answers})
    return rows

