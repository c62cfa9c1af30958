"""Sweeps (docs/sweeps.md): a grid of runs from one file, on a laptop or a Slurm cluster.

A sweep file names a ``base`` params file (relative to the sweep file), a ``sweep`` grid (dotted
key → list of values; the points are the product of the lists), optional ``zip`` groups (keys
whose lists have one length and vary together) and an ``executor`` (``kind``: local, processes or
slurm; ``workers``; for Slurm ``partition``, ``gpus_per_node``, ``timeout_min``, ``mem_gb``).

Each point is an ordinary run through the library — the same steps and keyed artifacts as
``hsr run``, without notebooks — in the run directory of its model and data (``run_name`` is the
model's name unless the sweep sets it), so points share every upstream artifact whose inputs are
equal. Upstream work shared by several points (data, Ships, scores, pruning) is done first, once
per key; then the points. A finished point is skipped on a re-run; a failing point is reported with
its run directory and log and does not stop the others; a failing shared step fails only the points
that stand on it, each reported with the step's log. Every point's params and inputs are checked
before anything runs (``--dry-run`` too): a bad one stops the sweep naming the point.
"""

from __future__ import annotations

import itertools
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .io import atomic_write_json, read_json, stable_hash
from .params import Params, ParamsError, load_params

EXECUTORS = ("local", "processes", "slurm")


class SweepError(ValueError):
    """A bad sweep file; the message names the file and the key."""


@dataclass
class Sweep:
    """A parsed sweep file: its base params, its points (override dicts) and how to run them."""

    path: Path
    base: Path
    points: list[dict[str, Any]]
    executor: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.stem

    def params(self, point: dict[str, Any]) -> Params:
        """The params of one point: the base file, the point's values, and a run_name naming its
        model (unless the sweep sets one), so points of one model share a run directory."""
        P = load_params(self.base, point)
        if "run_name" not in point:
            P = P.replace({"run_name": re.sub(r"[^\w.-]+", "-", P.model.name).strip("-")})
        return P

    def folder(self) -> Path:
        """``<runs_dir of its points>/sweeps/<sweep name>``: the points table, logs, notebook 07."""
        return Path(self.params(self.points[0]).runs_dir) / "sweeps" / self.name


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file (every point's params are checked too)."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise SweepError(f"{path}: cannot read the sweep file ({e})") from None
    unknown = set(spec) - {"base", "sweep", "zip", "executor"}
    if unknown:
        raise SweepError(f"{path}: unknown key {sorted(unknown)[0]!r}; a sweep file holds base, sweep, zip, executor")
    if "base" not in spec:
        raise SweepError(f"{path}: base: missing (the params file every point starts from)")
    base = (path.parent / spec["base"]).resolve()
    if not base.is_file():
        raise SweepError(f"{path}: base: no such params file {str(base)!r}")
    grids = spec.get("sweep") or {}
    grids = grids if isinstance(grids, list) else [grids]
    points: list[dict[str, Any]] = []
    for grid in grids:  # a list of grids: the union of their points (each point once)
        for p in _grid_points(path, grid, spec.get("zip") or []):
            if p not in points:
                points.append(p)
    executor = {"kind": "local", "workers": 1, **(spec.get("executor") or {})}
    if executor["kind"] not in EXECUTORS:
        raise SweepError(f"{path}: executor.kind: {executor['kind']!r}; use one of {', '.join(EXECUTORS)}")
    sw = Sweep(path, base, points, executor)
    for p in points:
        try:
            sw.params(p)
        except ParamsError as e:
            raise SweepError(f"{path}: point {p}: {e}") from None
    return sw


def _grid_points(path: Path, grid: Any, groups: list[list[str]]) -> list[dict[str, Any]]:
    """The points of one grid: the product of its lists, the keys of a ``zip`` group varying together."""
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise SweepError(f"{path}: sweep: must map dotted keys to non-empty lists of values (or be a list of such maps)")
    groups = [g for g in groups if any(k in grid for k in g)]
    zipped = [k for g in groups for k in g]
    for g in groups:
        missing = [k for k in g if k not in grid]
        if missing:
            raise SweepError(f"{path}: zip: {missing[0]!r} has no list under sweep")
        if len({len(grid[k]) for k in g}) != 1:
            raise SweepError(f"{path}: zip: {', '.join(g)} must have lists of one length")
    axes = [[{k: v} for v in grid[k]] for k in grid if k not in zipped]
    axes += [[dict(zip(g, vals)) for vals in zip(*(grid[k] for k in g))] for g in groups]
    return [{k: v for d in combo for k, v in d.items()} for combo in itertools.product(*axes)] if axes else [{}]


def validate(sw: Sweep, executor: dict[str, Any]) -> None:
    """Check every point before anything runs, as ``hsr run`` checks its params: the model name,
    the data and benchmarks and the bounds of the model's geometry; a :class:`SweepError` names the
    first bad point. On Slurm the data and models live on the nodes, so only what holds anywhere
    is checked here (the params, and ``tiny:`` / ``toy:`` model names)."""
    from .preflight import InputError, check, check_model
    from .runs import STEP_NAMES, resolve_paths

    done: dict[str, str | None] = {}
    for p in sw.points:
        try:
            P = resolve_paths(sw.params(p))
            key = stable_hash(P.to_dict())
            if key not in done:
                done[key] = None
                try:
                    if executor.get("kind") == "slurm":
                        if P.model.name.startswith(("tiny:", "toy:")):
                            check_model(P.model.name)
                    else:
                        check(P, set(STEP_NAMES))
                except InputError as e:
                    done[key] = str(e)
            if done[key]:
                raise SweepError(f"{sw.path}: point {point_id(p)} ({_values(p)}): {done[key]}")
        except ParamsError as e:
            raise SweepError(f"{sw.path}: point {point_id(p)} ({_values(p)}): {e}") from None


def _values(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items()) or "the base params"


def point_id(point: dict[str, Any]) -> str:
    """A short readable id of a point: its values, then a hash."""
    label = "_".join(f"{k.split('.')[-1]}={v}" for k, v in point.items()) or "base"
    clean = re.sub(r"[^\w.=-]+", "", label)[:60]
    return f"{clean}-{stable_hash(point)[:6]}"


def point_status(sw: Sweep, point: dict[str, Any]) -> dict[str, Any]:
    """Where a point runs and whether its evaluation is finished."""
    from . import steps
    from .runs import Run

    P = sw.params(point)
    run = Run(P, Path(P.runs_dir) / P.run_name)
    row = {"point": point_id(point), **{k: v for k, v in point.items()}, "values": point, "run_dir": str(run.dir)}
    try:
        spec = steps.evaluate.spec(P)
    except Exception as e:  # e.g. missing benchmark data: the point will fail, named, when it runs
        return {**row, "evaluation": None, "done": False, "problem": f"{type(e).__name__}: {e}"}
    return {**row, "evaluation": spec.where, "done": run.is_done(spec)}


def upstream_of(sw: Sweep, point: dict[str, Any]) -> tuple[str, str]:
    """What a point stands on, one name per wave: ``<run dir>: <ships> + <scores>`` and ``<run dir>: <prune>``."""
    from . import steps

    P = sw.params(point)
    where = Path(P.runs_dir) / P.run_name
    try:
        first = " + ".join(s.where for s in (steps.ships.spec(P), steps.scores.spec(P)))
        prune = steps.prune.spec(P).where
    except Exception as e:  # e.g. the data is not on this machine: the points will name it when they run
        first = prune = f"cannot be planned here ({type(e).__name__}: {e})"
    return f"{where}: {first}", f"{where}: {prune}"


def shared_upstream(sw: Sweep, points: list[dict[str, Any]]) -> list[list[tuple[str, dict[str, Any]]]]:
    """The upstream work the points share, in two waves of distinct keys (so parallel jobs never
    wait on each other): data, Ships and scores once per run directory and data, then each distinct
    pruning. Each wave is a list of ``(what, a point whose params compute it)``."""
    waves: list[dict[str, dict[str, Any]]] = [{}, {}]
    for p in points:
        for wave, what in zip(waves, upstream_of(sw, p)):
            wave.setdefault(what, p)
    return [list(w.items()) for w in waves]


def _retrying(fn: Callable[[], Any], patience_s: float = 3600.0) -> Any:
    """``fn()``, waiting while another process holds a key it needs (one writer per key)."""
    from .runs import LockHeld

    t0 = time.monotonic()
    while True:
        try:
            return fn()
        except LockHeld:
            if time.monotonic() - t0 > patience_s:
                raise
            time.sleep(2.0)


def run_upstream(sw_path: str, point: dict[str, Any], wave: int, log_dir: str | None = None,
                 events: str | None = None) -> dict[str, Any]:
    """Compute one wave of a point's shared upstream steps (a job of its own on a cluster); a failure
    is returned, not raised, with the log that holds its traceback. ``events``: the file the run
    directory's lines also go to (:func:`~hsr_lib.runs.use_events`), for the terminal."""
    import contextlib

    from . import steps
    from .runs import Run, use_events

    use_events(events)

    log = Path(log_dir or ".") / f"upstream-{wave}-{point_id(point)}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            P = load_sweep(sw_path).params(point)
            run = Run.open(P)
            if wave == 0:
                _retrying(lambda: steps.ships.run(run, progress=False))
                _retrying(lambda: steps.scores.run(run, progress=False))
            else:
                _retrying(lambda: steps.prune.run(run, progress=False))
            return {"status": "done", "run_dir": str(run.dir), "log": str(log)}
        except Exception as e:  # reported; the points that stand on it fail, the others go on
            traceback.print_exc()
            return {"status": "failed", "error": f"{type(e).__name__}: {e}", "log": str(log)}


def run_point(sw_path: str, point: dict[str, Any], log_dir: str, events: str | None = None) -> dict[str, Any]:
    """One point: every step through the library, into its run directory; failures are returned,
    not raised, with the log that holds the traceback."""
    import contextlib

    from . import steps
    from .runs import Run, use_events

    use_events(events)
    log = Path(log_dir) / f"{point_id(point)}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            P = load_sweep(sw_path).params(point)
            run = Run.open(P)
            res = _retrying(lambda: steps.evaluate.run(run, progress=False))
            return {"point": point_id(point), "status": "done", "run_dir": str(run.dir), "evaluation": str(res.dir),
                    "wall_s": round(time.perf_counter() - t0, 1), "log": str(log)}
        except Exception as e:  # reported, and the other points go on
            traceback.print_exc()
            return {"point": point_id(point), "status": "failed", "error": f"{type(e).__name__}: {e}",
                    "wall_s": round(time.perf_counter() - t0, 1), "log": str(log)}


def _run_points(sw: Sweep, ex: dict[str, Any], todo: list[dict[str, Any]], folder: Path, events) -> dict[str, dict]:
    """The shared upstream waves, then the points whose upstream succeeded; a point standing on a
    failed shared step fails with that step's error and log. Returns the points' results by id."""
    deps = {point_id(p): upstream_of(sw, p) for p in todo}
    broken: dict[str, dict[str, Any]] = {}  # upstream name -> the failed job's result
    logs = str(folder / "logs")
    for i in range(2):
        jobs: dict[str, dict[str, Any]] = {}
        for p in todo:
            what = deps[point_id(p)][i]
            if what not in jobs and what not in broken and not any(d in broken for d in deps[point_id(p)][:i]):
                jobs[what] = p  # computed with the params of a point whose earlier waves succeeded
        results = _map(ex["kind"], int(ex.get("workers", 1)), run_upstream,
                       [(str(sw.path), p, i, logs, str(events.path)) for p in jobs.values()], folder, ex)
        events.flush()
        for what, r in zip(jobs, results):
            if r["status"] != "done":
                broken[what] = r
                print(f"hsr sweep: shared step {what} failed: {r['error']}\n  log {r['log']}", file=sys.stderr)
    out: dict[str, dict[str, Any]] = {}
    runnable = []
    for p in todo:
        bad = next((broken[d] for d in deps[point_id(p)] if d in broken), None)
        if bad is None:
            runnable.append(p)
        else:
            what = next(d for d in deps[point_id(p)] if d in broken)
            out[point_id(p)] = {"point": point_id(p), "status": "failed", "log": bad["log"], "wall_s": 0.0,
                                "error": f"the shared step it stands on failed ({what}: {bad['error']})"}
    results = _map(ex["kind"], int(ex.get("workers", 1)), run_point,
                   [(str(sw.path), p, logs, str(events.path)) for p in runnable], folder, ex)
    events.flush()
    out.update({r["point"]: r for r in results})
    return out


def _ignore_interrupt() -> None:
    """A worker leaves Ctrl-C to the sweep's process, which stops it (no traceback per worker)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _quiet_resource_tracker() -> None:
    """Start multiprocessing's resource tracker without its warning about the semaphores of workers
    stopped by Ctrl-C (their progress-bar locks): ``hsr`` says the interruption in its one line."""
    from multiprocessing import resource_tracker

    sys.warnoptions.append("ignore::UserWarning")  # read once, by the tracker process started here
    try:
        resource_tracker.ensure_running()
    finally:
        sys.warnoptions.pop()


def _map(kind: str, workers: int, fn: Callable, args: list[tuple], folder: Path, executor: dict[str, Any]) -> list:
    """Run ``fn(*a)`` for every ``a`` with the executor of the sweep."""
    if kind == "local" or len(args) <= 1 and kind != "slurm":
        return [fn(*a) for a in args]
    if kind == "processes":
        import multiprocessing as mp

        _quiet_resource_tracker()
        pool = mp.get_context("spawn").Pool(workers, initializer=_ignore_interrupt)
        try:
            out = pool.starmap(fn, args, chunksize=1)
        except BaseException:  # Ctrl-C: the workers stop at once, and `hsr` says it in one line
            pool.terminate()
            raise
        pool.close()
        pool.join()
        return out
    ex = slurm_executor(folder, executor)
    jobs = ex.map_array(fn, *zip(*args)) if args else []
    return [j.result() for j in jobs]


def slurm_executor(folder: Path, executor: dict[str, Any]):
    """A submitit executor with the sweep's Slurm parameters (``cluster: local`` runs it here)."""
    import submitit

    ex = submitit.AutoExecutor(folder=str(folder / "slurm"), cluster=executor.get("cluster"))
    ex.update_parameters(**slurm_parameters(executor))
    return ex


def slurm_parameters(executor: dict[str, Any]) -> dict[str, Any]:
    """What a point's job asks Slurm for."""
    out = {"timeout_min": int(executor.get("timeout_min", 60)), "mem_gb": int(executor.get("mem_gb", 16)),
           "name": "hsr-sweep", "cpus_per_task": int(executor.get("cpus_per_task", 4))}
    if executor.get("partition"):
        out["slurm_partition"] = executor["partition"]
    if executor.get("gpus_per_node") is not None:
        out["gpus_per_node"] = int(executor["gpus_per_node"])
    return out


def run_sweep(path: str | Path, executor: dict[str, Any] | None = None, dry_run: bool = False,
              findings: bool = True) -> list[dict[str, Any]]:
    """Run every unfinished point of the sweep (shared upstream steps first), write the points table,
    then execute notebook 07 over them. Returns the points' rows."""
    sw = load_sweep(path)
    ex = {**sw.executor, **(executor or {})}
    validate(sw, ex)
    folder = sw.folder()
    status = [point_status(sw, p) for p in sw.points]
    todo = [p for p, s in zip(sw.points, status) if not s["done"]]
    waves = shared_upstream(sw, todo)
    if dry_run:
        print(f"sweep {sw.name}: {len(sw.points)} points, {len(todo)} to run ({ex['kind']}, {ex.get('workers', 1)} "
              f"worker(s)); shared upstream steps first:")
        for wave in waves:
            for where, _ in wave:
                print(f"  {where}")
        for s in status:
            print(f"  {'done ' if s['done'] else 'to do'} {s['point']}  ({s['run_dir']})")
        return status
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    from .runs import Events, use_events

    events = Events(folder / f".events-{os.getpid()}.log")
    try:
        by_id = _run_points(sw, ex, todo, folder, events)
    finally:
        events.close()
        use_events(None)  # the local executor ran the points in this process
    rows = []
    for p, s in zip(sw.points, status):
        r = by_id.get(s["point"], {"status": "done" if s["done"] else "missing"})
        rows.append({**s, "done": r["status"] == "done", "status": r["status"], "error": r.get("error"),
                     "log": r.get("log"), "wall_s": r.get("wall_s")})
    atomic_write_json(folder / "points.json", {"sweep": str(sw.path), "base": str(sw.base), "points": rows,
                                               "wall_s": round(time.perf_counter() - t0, 1)})
    for r in rows:
        if r["status"] == "failed":
            print(f"hsr sweep: point {r['point']} failed: {r['error']}\n  run directory {r['run_dir']}\n  log {r['log']}")
    if findings and all(r["done"] for r in rows):
        findings_notebook(folder)
    return rows


def findings_notebook(folder: Path, notebook: Path | None = None) -> Path | None:
    """Execute notebook 07 over the sweep's points into the sweep's folder (when the project has it)."""
    from .notebook import PROJECT_ROOT

    nb = notebook or PROJECT_ROOT / "notebooks" / "07_findings.ipynb"
    if not nb.is_file():
        return None
    import papermill as pm

    from .kernel import execute_options

    out = folder / nb.name
    pm.execute_notebook(str(nb), str(out), parameters={"sweep_dir": str(folder)}, cwd=str(PROJECT_ROOT),
                        progress_bar=False, **execute_options())
    return out


def status_table(path: str | Path):
    """A table of the sweep's points and their state (``hsr sweep FILE --status``)."""
    import pandas as pd

    sw = load_sweep(path)
    return pd.DataFrame([point_status(sw, p) for p in sw.points])


def read_points(folder: str | Path) -> list[dict[str, Any]]:
    """The points a finished sweep recorded (``points.json`` of its folder)."""
    return read_json(Path(folder) / "points.json")["points"]


# the settings every row of :func:`results` carries, by column name (the sweep's other keys are added by their dotted name)
SETTINGS = {"model": "model.name", "method": "pruning.method", "sparsity": "pruning.sparsity",
            "pattern": "pruning.pattern", "p": "realign.p", "q": "realign.q", "p_max": "realign.p_max",
            "top_h": "realign.top_h", "region": "realign.region", "ships_score": "ships.score"}


def sweep_of(folder: str | Path) -> Sweep:
    """The sweep a finished sweep folder was made from (the file ``points.json`` names)."""
    points = Path(folder) / "points.json"
    if not points.is_file():
        raise SweepError(f"{folder}: not a finished sweep's folder (no points.json; run `hsr sweep FILE` first)")
    return load_sweep(read_json(points)["sweep"])


def base_params(folder: str | Path) -> Params:
    """The base params every point of the sweep in ``folder`` starts from (the settings held where another varies)."""
    return load_params(sweep_of(folder).base)


def point_runs(folder: str | Path) -> list[tuple[dict[str, Any], Any]]:
    """``(point row, Run)`` for every point the sweep in ``folder`` recorded: each point's own params on its
    run directory (opening them writes nothing)."""
    from .runs import Run

    sw = sweep_of(folder)
    return [(p, Run(sw.params(p["values"]), Path(p["run_dir"]))) for p in read_points(folder)]


def results(folder: str | Path):
    """A sweep's results as one tidy table: a row per point, variant and row of its evaluation's
    ``metrics.csv`` (benchmark, metric, judge, value, n, …), with the point's settings as columns
    (:data:`SETTINGS` and every key the sweep varies, by its dotted name), the variant's restored
    ratio (‱) and the keys of the artifacts it stands on (``ships_key``, ``scores_key``,
    ``prune_key``, ``realign_key`` (the variant's own; empty for dense and pruned), ``evaluate_key``).
    A point whose evaluation is not finished is left out with a printed line naming it."""
    import pandas as pd

    from . import steps

    pairs = point_runs(folder)
    swept = sorted({k for p, _ in pairs for k in p["values"]} - set(SETTINGS.values()))
    frames = []
    for point, run in pairs:
        params = run.params
        try:
            ev = steps.evaluate.load(run)
        except steps.StepNotDone as e:
            print(f"[hsr] sweep point {point['point']} left out: {e}")
            continue
        settings = {col: _scalar(params.get(key)) for col, key in {**SETTINGS, **{k: k for k in swept}}.items()}
        keys = {"ships_key": steps.ships.spec(params).key, "scores_key": steps.scores.spec(params).key,
                "prune_key": steps.prune.spec(params).key, "evaluate_key": ev.key}
        status = ev.status.set_index("variant")
        source = status["from"].to_dict()
        realign_key = {v: w.split("/", 1)[1] if w.startswith(f"{steps.realign.NAME}/") else ""
                       for v, w in source.items()}
        m = ev.metrics
        frames.append(m.assign(point=point["point"], run_dir=str(run.dir), **settings, **keys,
                               realign_key=m.variant.map(realign_key),
                               restored_ratio_permyriad=m.variant.map(status["restored_ratio_permyriad"].to_dict())))
    if not frames:
        raise SweepError(f"{folder}: no point of this sweep has a finished evaluation")
    out = pd.concat(frames, ignore_index=True)
    lead = ["point", *SETTINGS, *swept, "variant"]
    return out[lead + [c for c in out.columns if c not in lead]]


def _scalar(value: Any) -> Any:
    """A setting as one table cell: lists and mappings as their YAML flow text."""
    return value if value is None or isinstance(value, (str, int, float, bool)) else \
        yaml.safe_dump(value, default_flow_style=True).strip()


def runs_beside(folder: str | Path) -> list[Any]:
    """The other run directories under the sweep's ``runs_dir`` (not a point's), each as a Run of the
    params it last ran with, when those have a finished evaluation: e.g. the toy models of other
    seeds a seeds sweep left beside the points."""
    from . import steps
    from .runs import Run

    pairs = point_runs(folder)
    taken = {str(run.dir) for _, run in pairs}
    root = Path(pairs[0][1].params.runs_dir) if pairs else None
    found = []
    for d in sorted(root.iterdir()) if root is not None and root.is_dir() else []:
        if str(d) in taken or not (d / "params.yaml").is_file():
            continue
        try:
            run = Run(load_params(d / "params.yaml"), d)
            steps.evaluate.load(run)
        except (ParamsError, steps.StepNotDone, OSError, ValueError):
            continue
        found.append(run)
    return found


__all__ = ["Sweep", "SweepError", "load_sweep", "run_sweep", "status_table", "read_points", "slurm_parameters",
           "point_id", "results", "point_runs", "base_params", "runs_beside", "sweep_of", "SETTINGS"]
