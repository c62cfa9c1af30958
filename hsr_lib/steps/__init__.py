"""The steps of a run, one module each and all of one shape (docs/library.md):

``spec(params) -> Spec``  the step's key and fingerprint, from params alone;
``run(run, *, upstream="compute", progress=True) -> Result``  compute, or reuse when done;
``load(run) -> Result``  the finished artifacts (``StepNotDone`` naming the step otherwise).

In order: :mod:`data` (01), :mod:`ships` (02), :mod:`scores` (03), :mod:`prune` (04),
:mod:`realign` (05), :mod:`evaluate` (06). :mod:`variants` resolves the model variants the
evaluation names (dense, pruned, hsr, hsr_a, random heads) to their artifacts.
"""

from . import data, ships, scores, prune, realign, variants, evaluate  # noqa: I001 (pipeline order)
from .base import MissingUpstream, Result, StepNotDone, ensure

STEPS = {m.NAME: m for m in (data, ships, scores, prune, realign, evaluate)}  # by runs.STEP_NAMES, in its order

__all__ = ["STEPS", "MissingUpstream", "Result", "StepNotDone", "data", "ensure", "evaluate", "prune", "realign",
           "scores", "ships", "variants"]
