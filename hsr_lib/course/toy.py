"""The shipped teaching toy as the exercises use it: its run (through the library, small evaluation),
the model, a few encoded harmful prompts, and the calibration inputs of one linear."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..notebook import PROJECT_ROOT
from ..params import load_params
from ..runs import Run

PARAMS = PROJECT_ROOT / "params" / "toy.yaml"
# the course's evaluation: three variants on the harmful splits, 30 items each (a few seconds)
COURSE = {"eval.variants": ["dense", "pruned", "hsr"],
          "eval.benchmarks": ["toy_harmful", "toy_harmful_novel", "toy_unsafe_image"], "eval.n_items": 30}


def toy_run(runs_dir: str | Path | None = None, **overrides: Any) -> Run:
    """The toy's run (params/toy.yaml with the course's evaluation and ``overrides``, dotted keys);
    steps are computed on first use and reused after."""
    over = {**COURSE, **overrides}
    if runs_dir is not None:
        over["runs_dir"] = str(Path(runs_dir).resolve())
    return Run.open(load_params(PARAMS, over))


def evaluate(run: Run):
    """The run's evaluation (every step before it computed when missing)."""
    from .. import steps

    return steps.evaluate.run(run, progress=False)


def geometry(run: Run):
    """The attention geometry (layers, heads, KV heads, head dim) of ``run``'s model, without its weights."""
    from ..steps.base import geometry as step_geometry

    return step_geometry(run.params)[2]


def load_toy(run: Run):
    """The dense toy model of ``run`` (float32, CPU)."""
    from ..models import load_model

    return load_model(run.params.model.name, dtype="float32", device="cpu")


def harmful_prompts(run: Run, lm, n: int = 4) -> list:
    """The first ``n`` Ships prompts (harmful requests, no answer), each encoded for the model."""
    from .. import steps
    from ..prompts import encode_prompt

    samples = steps.data.run(run, progress=False).load("ships_safety")[:n]
    return [encode_prompt(lm.processor, s, lm.adapter) for s in samples]


@torch.no_grad()
def calibration_inputs(run: Run, lm, name: str, n: int = 8, split: str = "scores_utility") -> list[torch.Tensor]:
    """What linear ``name`` (e.g. ``layers.1.self_attn.q_proj``) of the dense model receives at the
    response positions of the first ``n`` calibration samples: one [T_n, in] float32 tensor each."""
    from .. import steps
    from ..prompts import encode_calibration

    lin = lm.prunable_linears()[name]
    samples = steps.data.run(run, progress=False).load(split)[:n]
    out: list[torch.Tensor] = []
    for s in samples:
        cal = encode_calibration(lm.processor, s, run.params.fidelity, lm.adapter)
        got: dict[str, torch.Tensor] = {}
        handle = lin.register_forward_pre_hook(lambda m, a: got.__setitem__("x", a[0]))
        try:
            lm.model(**cal.inputs, use_cache=False)
        finally:
            handle.remove()
        out.append(got["x"][0, cal.start:cal.end].float().clone())
    return out
