"""What every step shares: its :class:`Result`, and making sure its upstream artifacts exist.

A step module has ``spec(params) -> Spec`` (its key, from params alone), ``run(run, *,
upstream="compute", progress=True) -> Result`` (compute or reuse) and ``load(run) -> Result``
(the finished artifacts). A missing upstream artifact is computed first with one printed line
naming it (``upstream="compute"``, what ``hsr run`` and the notebooks do), or refused with
:class:`MissingUpstream` naming it (``upstream="refuse"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..identity import is_local_model, model_fingerprint
from ..io import read_json
from ..models import model_config
from ..params import Params
from ..runs import Run, Spec

UPSTREAM_MODES = ("compute", "refuse")


class MissingUpstream(RuntimeError):
    """An artifact a step reads does not exist and the caller asked not to compute it."""


class StepNotDone(FileNotFoundError):
    """``load`` of a step whose keyed folder has not been finished."""


@dataclass
class Result:
    """A finished step: its keyed folder, key and summary."""

    dir: Path
    key: str
    summary: dict[str, Any] = field(repr=False)


def finished(run: Run, spec: Spec, what: str) -> tuple[Path, dict[str, Any]]:
    """The keyed folder and summary of a finished ``spec``; :class:`StepNotDone` naming it otherwise."""
    why = run.problem(spec)
    if why is not None:
        state = "has not finished for these params" if why in ("not computed", "made with other inputs") else \
            f"cannot be used ({why})"
        raise StepNotDone(f"{run.path(spec)}: the {what} step {state}; "
                          f"run it (hsr_lib.steps.{spec.step}.run)")
    d = run.path(spec)
    return d, read_json(d / "summary.json")


def ensure(run: Run, specs: Iterable[Spec], upstream: str = "compute", progress: bool = True) -> None:
    """Make every spec (and what it stands on) exist: compute the missing ones in order with a
    line naming each, or raise :class:`MissingUpstream` when ``upstream`` is 'refuse'."""
    if upstream not in UPSTREAM_MODES:
        raise ValueError(f"upstream={upstream!r}: use one of {', '.join(UPSTREAM_MODES)}")
    for spec in specs:
        if run.is_done(spec):
            continue
        if upstream == "refuse":
            raise MissingUpstream(f"missing upstream step {spec.step!r} ({run.path(spec)}); "
                                  f"run it first, or call with upstream='compute'")
        print(f"[hsr] computing upstream step {spec.step!r}: {spec.where}", flush=True)
        spec.runner(run.using(spec.params), upstream=upstream, progress=progress)


def repair_export(run: Run, spec: Spec, result: Any, wanted: bool) -> Any:
    """A finished step asked for its exported model (``save_model``) but lacking it (a crash while
    saving, or the flag turned on later): rebuild it from the artifacts, under the key's lock."""
    if wanted and not (result.dir / "model" / "config.json").is_file():
        with run.lock(spec):
            result.save_model()
    return result


def requirements(spec: Spec) -> tuple[Spec, ...]:
    """What must exist before ``spec`` runs: its ``needs`` and ``upstream``."""
    return (*spec.needs, *spec.upstream)


def model_reads(P: Params, dtype: str | None = None) -> dict[str, Any]:
    """What fixes the model's weights and numerics: the checkpoint by content
    (:func:`~hsr_lib.identity.model_fingerprint`; a local folder by that alone, not its path),
    family, attention kernel, the seed of a ``tiny:`` model, and the dtype it runs in (never the device)."""
    m = P.model
    return {"name": "local folder" if is_local_model(m.name) else m.name,
            "identity": model_fingerprint(m.name, P.seed), "family": m.family,
            "attn_implementation": m.attn_implementation, "seed": P.seed, "dtype": dtype or m.dtype}


def geometry(P: Params):
    """``(adapter, config, geometry)`` of the params' model, without loading its weights."""
    from ..adapters import adapter_for

    config = model_config(P.model.name, P.seed)
    adapter = adapter_for(config, P.model.family)
    return adapter, config, adapter.geometry(config)
