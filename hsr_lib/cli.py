"""``hsr``: run the notebooks of the pipeline in order with papermill, or show resolved params.

    hsr run params/tiny.yaml [-p pruning.sparsity=0.6 ...] [--from 02] [--to 05]
    hsr params params/tiny.yaml [-p KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

from .notebook import PROJECT_ROOT, read_records
from .params import ParamsError, load_params
from .progress import TEXT_ENV
from .runs import Run

NOTEBOOK = re.compile(r"^(\d\d)_[\w-]+\.ipynb$")


def notebooks(directory: Path, first: str | None = None, last: str | None = None) -> list[Path]:
    """The ``NN_name.ipynb`` files of ``directory`` in order, limited to ``first``..``last``."""
    found = sorted(p for p in directory.glob("*.ipynb") if NOTEBOOK.match(p.name))
    lo, hi = int(first or 0), int(last or 99)
    return [p for p in found if lo <= int(p.name[:2]) <= hi]


def run_pipeline(params_path: str, overrides: list[str], first: str | None = None, last: str | None = None,
                 notebook_dir: Path | None = None) -> int:
    """Execute the notebooks into ``<run>/notebooks``; stop at the first that fails. Returns an exit code."""
    import papermill as pm

    P = load_params(params_path, overrides)
    run = Run.open(P)
    todo = notebooks(notebook_dir or PROJECT_ROOT / "notebooks", first, last)
    if not todo:
        print(f"hsr: no notebooks NN_*.ipynb in {notebook_dir or PROJECT_ROOT / 'notebooks'} "
              f"between {first or '00'} and {last or '99'}", file=sys.stderr)
        return 2
    print(f"hsr: run {run.dir} ({P.model.name}, fidelity {P.fidelity}), {len(todo)} notebook(s)")
    os.environ[TEXT_ENV] = "1"  # kernels inherit it: text progress bars in the executed copies
    out_dir = run.dir / "notebooks"
    out_dir.mkdir(exist_ok=True)
    total = time.perf_counter()
    for i, nb in enumerate(todo, 1):
        out = out_dir / nb.name
        print(f"[{i}/{len(todo)}] {nb.stem} ...", flush=True)
        t0 = time.perf_counter()
        try:
            pm.execute_notebook(str(nb), str(out), parameters={"params_path": str(run.params_path)},
                                cwd=str(PROJECT_ROOT), kernel_name="python3", progress_bar=sys.stderr.isatty())
        except pm.PapermillExecutionError as err:
            wall = round(time.perf_counter() - t0, 2)
            run.update_manifest("notebooks", nb.stem, {"wall_s": wall, "status": "failed", "path": str(out)})
            print(f"hsr: {nb.name} failed in cell {err.exec_count}: {err.ename}: {err.evalue}\n"
                  f"     executed copy: {out}", file=sys.stderr)
            return 1
        wall = round(time.perf_counter() - t0, 2)
        run.update_manifest("notebooks", nb.stem, {"wall_s": wall, "status": "ok", "path": str(out),
                                                   "records": read_records(out)})
        print(f"      done in {wall:.1f}s -> {out}", flush=True)
    print(f"hsr: finished in {time.perf_counter() - total:.1f}s; manifest {run.dir / 'manifest.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hsr", description="Hierarchical Safety Realignment: the notebook pipeline")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="execute the notebooks in order into the run directory")
    r.add_argument("params", help="a params YAML file, e.g. params/tiny.yaml")
    r.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="override a param with a dotted key, e.g. -p pruning.sparsity=0.6 (repeatable)")
    r.add_argument("--from", dest="first", metavar="NN", help="first notebook number to run (e.g. 02)")
    r.add_argument("--to", dest="last", metavar="NN", help="last notebook number to run (e.g. 05)")
    r.add_argument("--notebooks", type=Path, default=None, help="folder of the notebooks (default: the project's)")
    s = sub.add_parser("params", help="print the resolved params (defaults, file, overrides merged)")
    s.add_argument("params", nargs="?", default=None)
    s.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    for flag in ("first", "last"):
        v = getattr(args, flag, None)
        if v is not None and not re.fullmatch(r"\d{1,2}", v):
            ap.error(f"--{'from' if flag == 'first' else 'to'} {v!r}: give a notebook number such as 02")
    try:
        if args.cmd == "params":
            import yaml

            print(yaml.safe_dump(load_params(args.params, args.param).to_dict(), sort_keys=False), end="")
            return 0
        return run_pipeline(args.params, args.param, args.first, args.last, args.notebooks)
    except ParamsError as err:
        print(f"hsr: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
