"""The model variants of a run that notebook 06 evaluates: dense, pruned and realigned.

``dense`` is always there (the checkpoint the params name). ``pruned`` exists once the pruning
step has finished (``<run>/prune/_step.json``), ``realigned`` once realignment has
(``<run>/realign/_step.json``); both are rebuilt from the dense checkpoint plus their artifacts.
"""

from __future__ import annotations

from typing import Any

from .models import LoadedModel, load_from_params
from .runs import MARKER, Run

VARIANTS: tuple[str, ...] = ("dense", "pruned", "realigned")
STEP_OF: dict[str, str | None] = {"dense": None, "pruned": "prune", "realigned": "realign"}


def _check(name: str) -> None:
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; variants: {', '.join(VARIANTS)}")


def is_available(run: Run, name: str) -> bool:
    """True when the variant's artifacts exist in ``run`` (dense: always)."""
    _check(name)
    step = STEP_OF[name]
    return step is None or (run.step_dir(step) / MARKER).is_file()


def available_variants(run: Run) -> list[str]:
    """The variants that can be evaluated now, in the order dense, pruned, realigned."""
    return [v for v in VARIANTS if is_available(run, v)]


def variant_fingerprint(run: Run, name: str) -> str | None:
    """The recorded fingerprint of the step that made the variant (None for dense or when absent)."""
    _check(name)
    step = STEP_OF[name]
    return run.recorded(step).get("fingerprint") if step else None


def variant_status(run: Run) -> list[dict[str, Any]]:
    """One row per variant: name, whether it is available, and why not."""
    rows = []
    for v in VARIANTS:
        step = STEP_OF[v]
        ok = is_available(run, v)
        note = ("the params' model" if step is None else f"from {run.step_dir(step).name}/" if ok
                else f"not available yet (no {step}/{MARKER}: run notebook {'04' if step == 'prune' else '05'})")
        rows.append({"variant": v, "available": ok, "note": note})
    return rows


def load_variant(run: Run, name: str) -> LoadedModel:
    """Load a variant of the run's model: the params' checkpoint (dense), or that checkpoint
    plus the pruning artifacts (pruned), plus the restored entries too (realigned); DESIGN §8-9.
    FileNotFoundError when the variant's step has not run."""
    _check(name)
    if name == "dense":
        return load_from_params(run.params)
    step = STEP_OF[name]
    if not is_available(run, name):
        raise FileNotFoundError(f"variant {name!r}: {run.step_dir(step) / MARKER} does not exist; run the {step} "
                                "step first")
    if name == "pruned":
        from .prune import build_pruned

        return build_pruned(run)
    from .realign_step import build_realigned

    return build_realigned(run)
