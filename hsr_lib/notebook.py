"""What every notebook calls: start a run from its parameters, and record values that tests
and the runner read back from the executed notebook."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from .params import load_params
from .progress import use_text
from .runs import Run, use_events

RECORD_MIME = "application/vnd.hsr.record+json"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def start(params_path: str | None, overrides: dict | list | None = None, *, verify: bool = False,
          force: Sequence[str] = (), token: str | None = None, text_progress: bool = False,
          events: str | None = None) -> Run:
    """Load the params (path relative to the project root when run from ``notebooks/``), open
    the run directory with this invocation's options (:class:`~hsr_lib.runs.Run`: ``verify``,
    ``force``, ``token``; ``text_progress`` draws progress bars as text; ``events`` names the file
    that repeats the run directory's lines on the terminal, :func:`~hsr_lib.runs.use_events`) and
    print where it is.
    ``hsr run`` passes the options in the notebook's ``run_options`` parameter."""
    if Path.cwd().name == "notebooks" and (Path.cwd().parent / "hsr_lib").is_dir():
        os.chdir(Path.cwd().parent)  # relative paths in params files are relative to the project root
    use_text(text_progress)
    use_events(events)
    params = load_params(params_path, overrides or None)
    run = Run.open(params, verify=verify, force=tuple(force), token=token)
    print(f"run      {run.dir}\nmodel    {params.model.name}\nfidelity {params.fidelity}")
    return run


def _jsonable(value: Any) -> Any:
    """Numbers, strings, lists and dicts as plain JSON (numpy/torch scalars and arrays too)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def record(name: str, value: Any) -> None:
    """Store ``value`` under ``name`` in the notebook's output for :func:`read_records` (tests, the
    runner's manifest), without showing it: the output carries only a data type no front end
    draws, plus an empty text part (as recommenders' ``store_metadata`` does). A reader who needs
    the values gets a table from the notebook instead."""
    from IPython.display import display

    value = _jsonable(value)
    json.dumps(value)  # fail here, not when the notebook is saved
    display({RECORD_MIME: {"name": name, "value": value}, "text/plain": ""}, raw=True)


def read_records(notebook: str | os.PathLike) -> dict[str, Any]:
    """Every value an executed notebook recorded, by name (a later record wins)."""
    import nbformat

    nb = nbformat.read(str(notebook), as_version=4)
    out: dict[str, Any] = {}
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            rec = o.get("data", {}).get(RECORD_MIME)
            if rec is not None:
                out[rec["name"]] = rec["value"]
    return out
