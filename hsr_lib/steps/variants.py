"""The model variants a run evaluates (not a step: what the evaluate step resolves) (``eval.variants``), each resolved to its keyed artifacts:

* ``dense``: the checkpoint the params name;
* ``pruned``: that checkpoint plus the pruning of ``pruning.*`` (``prune/<key>/``);
* ``hsr``, ``hsr_a``: the pruned model realigned with ``realign.*`` and that variant
  (``realign/<key>/``);
* ``random_heads`` (seed ``realign.seed``) and ``random_heads@<seed>``: realigned inside randomly
  drawn heads, one variant per seed.
"""

from __future__ import annotations

from typing import Any

from ..io import stable_hash
from ..models import LoadedModel, load_from_params
from ..params import Params, parse_variant
from ..runs import Run, Spec
from . import prune, realign
from .base import ensure, model_reads

BASE = ("dense", "pruned")
parse = parse_variant


def variant_params(P: Params, name: str) -> Params:
    """The params that make variant ``name``: ``P`` with ``realign.variant`` (and seed) set."""
    kind, seed = parse(name)
    if kind in BASE:
        return P
    over: dict[str, Any] = {"realign.variant": kind}
    if seed is not None:
        over["realign.seed"] = seed
    return P.replace(over)


def variant_spec(P: Params, name: str) -> Spec | None:
    """The keyed artifact a variant is rebuilt from (None for dense)."""
    kind, _ = parse(name)
    if kind == "dense":
        return None
    if kind == "pruned":
        return prune.spec(P)
    return realign.spec(variant_params(P, name))


def fingerprint(P: Params, name: str) -> str:
    """What the variant's weights depend on: the model, plus its artifact's fingerprint."""
    s = variant_spec(P, name)
    return stable_hash({"model": model_reads(P), "artifact": None if s is None else s.fingerprint})


def label(name: str) -> str:
    """A variant name as a folder-name part ('random_heads@3' → 'random_heads-s3')."""
    kind, seed = parse(name)
    return kind if seed is None else f"{kind}-s{seed}"


def is_available(run: Run, name: str) -> bool:
    """True when the variant's artifacts exist in ``run`` (dense: always)."""
    s = variant_spec(run.params, name)
    return s is None or run.is_done(s)


def status(run: Run, names: list[str]) -> list[dict[str, Any]]:
    """One row per variant: name, whether it is available, and where from."""
    rows = []
    for v in names:
        s = variant_spec(run.params, v)
        ok = is_available(run, v)
        note = ("the params' model" if s is None else f"from {s.where}" if ok else f"not computed yet ({s.where})")
        rows.append({"variant": v, "available": ok, "note": note})
    return rows


def load_variant(run: Run, name: str, upstream: str = "compute", progress: bool = True) -> LoadedModel:
    """Load a variant of the run's model (docs/method.md), computing its artifacts first when they are
    missing (``upstream='refuse'``: a MissingUpstream error naming them instead)."""
    kind, _ = parse(name)
    if kind == "dense":
        return load_from_params(run.params)
    ensure(run, [variant_spec(run.params, name)], upstream, progress)
    if kind == "pruned":
        return prune.load(run).build()
    return realign.load(run.using(variant_params(run.params, name))).build()


def restored_ratio(run: Run, name: str) -> float | None:
    """The restored ratio (‱) of a realigned variant (None for dense, pruned, or while absent)."""
    kind, _ = parse(name)
    if kind in BASE or not is_available(run, name):
        return None
    return realign.load(run.using(variant_params(run.params, name))).summary["restored_ratio_permyriad"]
