"""The Ships step (notebook 02): score every head on the run's harmful prompts, persist each
layer as it finishes (a killed run resumes there), and write, in ``ships/<key>/``:

``head_scores_<score>.json``  each of the three scores in the authors' one-line format
``head_scores.csv``           layer, head, and all three scores with their ranks
``prompts.jsonl``             per prompt: token ids, the scored (last) position, image geometry
``summary.json``              prompts, totals per score, ablation settings

All three scores are stored, so choosing another ``ships.score`` recomputes nothing; which heads
a later step uses (``realign.top_h``) is not part of this step either.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..io import atomic_write_json, atomic_write_jsonl, atomic_write_text, read_json
from ..models import load_model
from ..params import Params
from ..prompts import encode_prompt, token_record
from ..runs import Run, Spec
from ..ships import SCORES, Head, dumps_authors, ordered, ranks, select_heads, table
from ..ships_engine import AblationConfig, LayerScores, ships_engine
from . import data
from .base import Result, ensure, finished, model_reads, requirements

NAME = "ships"


@dataclass
class ShipsResult(Result):
    """Scores of a run: ``all`` holds every score variant, ``score`` names the params' choice."""

    all: LayerScores = None
    score: str = "subspace"

    @property
    def scores(self) -> dict[str, float]:
        """The chosen score of every head, ``{"<layer>-<head>": value}`` in layer-major order."""
        return self.all[self.score]

    def top(self, top_h: int) -> list[Head]:
        """The global top-``top_h`` heads by the chosen score (ties keep layer-major order)."""
        if top_h > len(self.scores):
            raise ValueError(f"realign.top_h = {top_h} but the model has only {len(self.scores)} heads")
        return select_heads(self.scores, top_h)

    def table(self):
        """Tidy table: layer, head, score, rank, and each score variant."""
        return table(self.scores, self.all)


def spec(params: Params) -> Spec:
    """Ships' key: the model, the harmful prompts and how heads are ablated (not which score is chosen)."""
    s = params.ships
    reads = {"model": model_reads(params, s.dtype), "fidelity": params.fidelity,
             "prompts": data.sample_fingerprint(params, "ships_safety"),
             "ablation": {"epsilon": s.epsilon, "parts": list(s.parts), "r_max": s.r_max,
                          "gqa_slot_bug": s.gqa_slot_bug, "non_causal": s.non_causal}}
    label = f"{s.dtype}-eps{s.epsilon:g}-{''.join(s.parts)}"
    return Spec(NAME, label, reads, needs=(data.spec(params),), params=params, runner=run)


def load(run: Run) -> ShipsResult:
    """The finished Ships artifacts of ``run``'s params."""
    s = spec(run.params)
    d, summary = finished(run, s, "Ships")
    return ShipsResult(d, s.key, summary, read_json(d / "head_scores_all.json"), run.params.ships.score)


def _resumable(layer_dir: Path, fingerprint: str) -> dict[int, LayerScores]:
    """Per-layer results saved by an interrupted attempt with the same fingerprint."""
    done = {}
    for f in sorted(layer_dir.glob("layer_*.json")):
        rec = read_json(f)
        if rec.get("fingerprint") == fingerprint:
            done[rec["layer"]] = rec["scores"]
    return done


def run(run: Run, *, upstream: str = "compute", progress: bool = True) -> ShipsResult:
    """Compute (or reuse) the Ships scores of ``run``."""
    params, s = run.params, spec(run.params)
    ensure(run, requirements(s), upstream, progress)
    if run.is_done(s):
        return load(run)
    samples = data.load(run).load("ships_safety")
    lm = load_model(params.model.name, params.model.family, params.ships.dtype, params.model.device,
                    params.model.attn_implementation,
                    seed=params.seed)
    prompts = [encode_prompt(lm.processor, x, lm.adapter, lm.device) for x in samples]
    with run.step(s, keep=("layers/layer_*.json",)) as out:  # the layers scored so far: resumed
        layer_dir = out / "layers"
        done = _resumable(layer_dir, s.fingerprint)
        if done and progress:
            print(f"resuming: {len(done)} of {lm.geometry.n_layers} layers already scored")

        def save(layer: int, scores: LayerScores) -> None:
            atomic_write_json(layer_dir / f"layer_{layer:03d}.json",
                              {"layer": layer, "fingerprint": s.fingerprint, "scores": scores})

        atomic_write_jsonl(out / "prompts.jsonl", [token_record(x.id, enc, last=int(enc["input_ids"].shape[1]) - 1)
                                                   for x, enc in zip(samples, prompts)])
        scores = ships_engine(lm, prompts, AblationConfig.from_params(params), params.ships.batch_heads, done, save,
                              progress)
        scores = {k: ordered(scores[k]) for k in SCORES}
        for k in SCORES:
            atomic_write_text(out / f"head_scores_{k}.json", dumps_authors(scores[k]) + "\n")
        atomic_write_json(out / "head_scores_all.json", scores)
        csv = table(scores["subspace"], scores).drop(columns=["score", "rank"])
        for k in SCORES:
            rk = ranks(scores[k])
            csv[f"{k}_rank"] = [rk[f"{a}-{b}"] for a, b in zip(csv["layer"], csv["head"])]
        atomic_write_text(out / "head_scores.csv", csv.to_csv(index=False))
        summary = {"fidelity": params.fidelity, "model": params.model.name, "n_prompts": len(prompts),
                   "layers": lm.geometry.n_layers, "heads": lm.geometry.n_heads,
                   "total": {k: sum(v.values()) for k, v in scores.items()},
                   "epsilon": params.ships.epsilon, "parts": list(params.ships.parts),
                   "gqa_slot_bug": params.ships.gqa_slot_bug,
                   "non_causal": params.ships.non_causal, "dtype": params.ships.dtype}
        atomic_write_json(out / "summary.json", summary)
    return load(run)
