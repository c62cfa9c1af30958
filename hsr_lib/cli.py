"""``hsr``: run the notebooks of the pipeline in order with papermill, or show resolved params.

    hsr run params/tiny.yaml [-p pruning.sparsity=0.6 ...] [--from 02] [--to 05] [--verify] [--force STEP|all]
    hsr params params/tiny.yaml [-p KEY=VALUE ...]
    hsr toy train --seed S [--out DIR]      train the teaching toy (one thread, one to two minutes)
    hsr toy ship --seed S                   train it into the package and write its card's numbers
    hsr toy seeds --seeds 0-9 [--workers 2] the seed table (train and run the pipeline per seed)
    hsr sweep params/sweeps/FILE.yaml [--executor local|processes|slurm] [--workers N] [--status] [--dry-run]
    hsr course student OUT                  the exercises' student version (solutions taken out)
    hsr book RUN_DIR [--sweep DIR] [--out DIR]  a finished run's notebooks and the exercises as a static site
    hsr export RUN_DIR --variant pruned|hsr|hsr_a|random_heads@S [-p KEY=VALUE ...] [--out DIR] [--format F]

Exit codes: 0 done, 1 a step failed (the message names the notebook, its error and the executed
copy), 2 bad params or inputs (named before any notebook starts), 3 a step's key is locked by
another process, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from pathlib import Path

from .notebook import PROJECT_ROOT, read_records
from .export import ExportError
from .params import ParamsError, load_params, resolve_paths
from .preflight import InputError, check, steps_for
from .sweep import SweepError
from .runs import STEP_NAMES, Events, Run

NOTEBOOK = re.compile(r"^(\d\d)_[\w-]+\.ipynb$")
LAST_RUN_NOTEBOOK = 6  # 07 (findings) reads a sweep, not a run: `hsr sweep` executes it
EXIT_OK, EXIT_FAILED, EXIT_INPUT, EXIT_LOCKED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def notebooks(directory: Path, first: str | None = None, last: str | None = None) -> list[Path]:
    """The ``NN_name.ipynb`` files of ``directory`` in order, limited to ``first``..``last``."""
    found = sorted(p for p in directory.glob("*.ipynb") if NOTEBOOK.match(p.name))
    lo, hi = int(first or 0), min(int(last or 99), LAST_RUN_NOTEBOOK)
    return [p for p in found if lo <= int(p.name[:2]) <= hi]


def kernel_parameters(run: Run, events: Path | None = None) -> dict:
    """What a notebook of the run receives, as papermill parameters (the one channel into its
    kernel): the resolved params, and this invocation's options for :func:`hsr_lib.notebook.start`
    (``events``: the file its run-directory lines go to, for this terminal)."""
    options = {"verify": run.verify, "force": list(run.force), "token": run.token, "text_progress": True}
    return {"params_path": None, "overrides": run.params.to_dict(),
            "run_options": {**options, **({"events": str(events)} if events else {})}}


class _QuietDeath(logging.Filter):
    """Drop nbclient's log line for a dead kernel: ``hsr`` says it in its own one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Kernel died" not in record.getMessage()


def _execute(nb: Path, out: Path, run: Run, events: Path | None = None) -> None:
    """Execute ``nb`` into a hidden working copy; only a success replaces ``out`` (the last good
    executed copy), a failure is kept beside it as ``NN_name.failed.ipynb``. The kernel is stopped
    at once when the run ends or is interrupted (a graceful shutdown mid-cell makes it print a
    traceback of its own)."""
    import papermill as pm

    from .kernel import execute_options

    work = out.with_name(f".{out.stem}.running.ipynb")
    failed = out.with_name(f"{out.stem}.failed.ipynb")
    quiet = _QuietDeath()
    logging.getLogger("papermill").addFilter(quiet)
    try:
        pm.execute_notebook(str(nb), str(work), parameters=kernel_parameters(run, events), cwd=str(PROJECT_ROOT),
                            progress_bar=sys.stderr.isatty(), shutdown_kernel="immediate", **execute_options())
    except BaseException:
        if work.exists():
            os.replace(work, failed)
        raise
    finally:
        logging.getLogger("papermill").removeFilter(quiet)
    os.replace(work, out)
    failed.unlink(missing_ok=True)


def run_pipeline(params_path: str, overrides: list[str], first: str | None = None, last: str | None = None,
                 notebook_dir: Path | None = None, verify: bool = False, force: tuple[str, ...] = ()) -> int:
    """Check everything, then execute the notebooks into ``<run>/notebooks``; stop at the first that
    fails. Returns an exit code."""
    import papermill as pm
    from nbclient.exceptions import DeadKernelError

    folder = notebook_dir or PROJECT_ROOT / "notebooks"
    todo = notebooks(folder, first, last)
    if not todo:
        print(f"hsr: no notebooks NN_*.ipynb in {folder} between {first or '00'} and {last or '99'}", file=sys.stderr)
        return EXIT_INPUT
    P = resolve_paths(load_params(params_path, overrides))
    check(P, steps_for(int(p.name[:2]) for p in todo))
    try:
        run = Run.open(P, verify=verify, force=force)
    except OSError as e:
        raise InputError(f"runs_dir = {P.runs_dir!r}: cannot create {str(Path(P.runs_dir) / P.run_name)!r} "
                         f"({e.strerror or e})") from None
    print(f"hsr: run {run.dir} ({P.model.name}, fidelity {P.fidelity}), {len(todo)} notebook(s)")
    out_dir = run.dir / "notebooks"
    out_dir.mkdir(exist_ok=True)
    events = Events(run.dir / f".events-{os.getpid()}.log")
    try:
        return _run_notebooks(todo, out_dir, run, events, pm.PapermillExecutionError, DeadKernelError)
    finally:
        events.close()


def _run_notebooks(todo: list[Path], out_dir: Path, run: Run, events: Events, failure: type, death: type) -> int:
    """Execute ``todo`` in order; a failure leaves the manifest's entries as they were (the failed
    executed copy is its record) and is said in one line."""
    total = time.perf_counter()
    for i, nb in enumerate(todo, 1):
        out = out_dir / nb.name
        print(f"[{i}/{len(todo)}] {nb.stem} ...", flush=True)
        t0 = time.perf_counter()
        failed = out.with_name(f"{out.stem}.failed.ipynb")
        try:
            _execute(nb, out, run, events.path)
        except failure as err:
            events.flush()
            print(f"hsr: {nb.name} failed in cell {err.exec_count}: {err.ename}: {err.evalue}\n"
                  f"     executed copy: {failed}", file=sys.stderr)
            return EXIT_LOCKED if err.ename == "LockHeld" else EXIT_FAILED
        except death:
            events.flush()
            print(f"hsr: {nb.name}: the kernel died while running it, most likely killed by the system for lack of "
                  f"memory (the OOM killer; `dmesg` says); executed copy: {failed}", file=sys.stderr)
            return EXIT_FAILED
        finally:
            events.flush()
        wall = round(time.perf_counter() - t0, 2)
        run.record_notebook(nb.stem, {"wall_s": wall, "status": "ok", "path": str(out.relative_to(run.dir)),
                                      "records": read_records(out)})
        print(f"      done in {wall:.1f}s -> {out}", flush=True)
    print(f"hsr: finished in {time.perf_counter() - total:.1f}s; manifest {run.dir / 'manifest.json'}")
    return EXIT_OK


def _force(value: str) -> str:
    if value != "all" and value not in STEP_NAMES:
        raise argparse.ArgumentTypeError(f"{value!r}: give a step ({', '.join(STEP_NAMES)}) or all")
    return value


def _seeds(text: str) -> list[int]:
    if re.fullmatch(r"\d+-\d+", text):
        a, b = (int(x) for x in text.split("-"))
        return list(range(a, b + 1))
    return [int(x) for x in text.split(",")]


def toy_command(args) -> int:
    """``hsr toy train|ship|seeds``."""
    import json
    import tempfile

    from . import toy_model, toy_study

    if args.action == "train":
        out = args.out or toy_model.cache_path(toy_model.Recipe(seed=args.seed))
        _, _, card = toy_model.train(toy_model.Recipe(seed=args.seed), out)
        print(f"hsr: toy seed {args.seed} trained in {card['train_s']} s ({card['train_cpu_s']} s of CPU) -> {out}")
        return EXIT_OK
    runs = args.runs_dir or Path(tempfile.mkdtemp(prefix="hsr-toy-"))
    if args.action == "seeds":
        out = args.out or toy_model.ASSETS / "seeds.csv"
        worlds = ("dev", "test") if args.world == "both" else (args.world,)
        table = toy_study.seed_table(_seeds(args.seeds), runs, out, args.workers, worlds)
        print(table.to_string(index=False))
        print(f"hsr: seed table -> {out}")
        return EXIT_OK
    card = toy_model.ship(args.seed)  # the cached checkpoint of this recipe and seed, or trained now
    expected = {}
    for world in ("test", "dev"):
        _, table, summary = toy_study.run_toy("toy:qwen2_vl", runs, world=world)
        expected[world] = ({r["variant"]: {k: v for k, v in r.items() if k != "variant" and not k.endswith("_sd")}
                            for r in table.to_dict(orient="records")}, summary)
    card["expected"], card["summary"] = expected["test"]
    card["expected_dev"], card["summary_dev"] = expected["dev"]
    dev_csv = toy_model.ASSETS / "seeds_dev.csv"
    import pandas as pd

    rule = toy_study.choose_seed(pd.read_csv(dev_csv)) if dev_csv.is_file() else None
    if dev_csv.is_file():
        card["targets"] = {w: toy_study.table_targets(pd.read_csv(toy_model.ASSETS / f))
                           for w, f in (("dev", "seeds_dev.csv"), ("test", "seeds.csv"))}
    card["chosen"] = (f"seed {args.seed}" + (", the seed the rule in docs/toy.md picks from the development-world "
                      "seed table (seeds_dev.csv): the median HSR RSR among the seeds meeting every target"
                      if rule == args.seed else ", not the seed the rule in docs/toy.md picks from seeds_dev.csv "
                      f"({rule})"))
    (toy_model.SHIPPED / "toy_card.json").write_text(json.dumps(card, indent=1, default=float) + "\n")
    print(table.round(2).to_string(index=False))
    print(f"hsr: shipped toy seed {args.seed} -> {toy_model.SHIPPED}")
    return EXIT_OK


def sweep_command(args) -> int:
    """``hsr sweep FILE``: exit 0 when every point finished, 1 when one failed (named with its log)."""
    from .sweep import run_sweep, status_table

    if args.status:
        print(status_table(args.file).to_string(index=False))
        return EXIT_OK
    over = {k: v for k, v in (("kind", args.executor), ("workers", args.workers), ("partition", args.partition),
                              ("gpus_per_node", args.gpus_per_node), ("timeout_min", args.timeout_min),
                              ("mem_gb", args.mem_gb)) if v is not None}
    rows = run_sweep(args.file, over, dry_run=args.dry_run, findings=not args.no_findings)
    if args.dry_run:
        return EXIT_OK
    failed = [r for r in rows if r["status"] != "done"]
    print(f"hsr sweep: {len(rows) - len(failed)} of {len(rows)} points done")
    return EXIT_FAILED if failed else EXIT_OK


def course_command(args) -> int:
    """``hsr course student OUT``."""
    from .course.student import write_student

    written = write_student(args.out)
    print(f"hsr: student version of {len(written)} exercise(s) -> {args.out}")
    return EXIT_OK


def book_command(args) -> int:
    """``hsr book RUN_DIR``: the static site."""
    from .book import BookError, build_book

    try:
        index = build_book(args.run_dir, args.out, sweep_dir=args.sweep)
    except BookError as err:
        raise InputError(str(err)) from None
    print(f"hsr: site -> {index} (open it in a browser; it loads nothing from the network)")
    return EXIT_OK


def export_command(args) -> int:
    """``hsr export RUN_DIR --variant V``: the variant as an HF model folder with its card (docs/using-the-model.md)."""
    from .export import export, summary_line

    # transformers' loading and shard-writing bars are instant for one model; the summary line says what was written
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    print(summary_line(export(args.run_dir, args.variant, args.param, args.out, args.format)))
    return EXIT_OK


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
    r.add_argument("--verify", action="store_true", help="re-hash every artifact before trusting it")
    r.add_argument("--force", action="append", default=[], type=_force, metavar="STEP",
                   help="recompute this step (or all) even when its artifacts are intact (repeatable)")
    s = sub.add_parser("params", help="print the resolved params (defaults, file, overrides merged)")
    s.add_argument("params", nargs="?", default=None)
    s.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE")
    t = sub.add_parser("toy", help="the teaching toy: train it, ship it, or make its seed table")
    t.add_argument("action", choices=["train", "ship", "seeds"])
    t.add_argument("--seed", type=int, default=0, help="training seed (train, ship)")
    t.add_argument("--out", type=Path, default=None, help="train: the folder to write (default: the toy cache); "
                   "seeds: the CSV (default: hsr_lib/toy_assets/seeds.csv)")
    t.add_argument("--seeds", default="0-9", help="seeds: a range a-b or a comma list (default 0-9)")
    t.add_argument("--workers", type=int, default=1, help="seeds: processes in parallel (one thread each)")
    t.add_argument("--runs-dir", type=Path, default=None, help="ship, seeds: where the pipeline runs go")
    t.add_argument("--world", choices=["test", "dev", "both"], default="test",
                   help="seeds: evaluate on the frozen test set, the development world, or both (seeds_dev.csv)")
    w = sub.add_parser("sweep", help="run a grid of points (docs/sweeps.md), then notebook 07 over them")
    w.add_argument("file", help="a sweep file, e.g. params/sweeps/toy_findings.yaml")
    w.add_argument("--executor", choices=["local", "processes", "slurm"], default=None)
    w.add_argument("--workers", type=int, default=None)
    w.add_argument("--partition", default=None)
    w.add_argument("--gpus-per-node", type=int, default=None)
    w.add_argument("--timeout-min", type=int, default=None)
    w.add_argument("--mem-gb", type=int, default=None)
    w.add_argument("--status", action="store_true", help="show the points and their state, run nothing")
    w.add_argument("--dry-run", action="store_true", help="list what would run, with the shared upstream steps")
    w.add_argument("--no-findings", action="store_true", help="do not execute notebook 07 at the end")
    c = sub.add_parser("course", help="the course: write the exercises' student version (docs/course.md)")
    c.add_argument("action", choices=["student"])
    c.add_argument("out", type=Path, help="the folder to write the student notebooks into")
    b = sub.add_parser("book", help="render a finished run's notebooks and the exercises as a static site")
    b.add_argument("run_dir", type=Path, help="a run directory with executed notebooks (runs/<name>)")
    b.add_argument("--sweep", type=Path, default=None, help="a sweep folder whose executed 07 joins the site")
    b.add_argument("--out", type=Path, default=None, help="the site's folder (default: RUN_DIR/book)")
    x = sub.add_parser("export", help="a variant of a finished run as an HF model folder with a model card")
    x.add_argument("run_dir", type=Path, help="a run directory, e.g. runs/toy")
    x.add_argument("--variant", required=True, help="pruned, hsr, hsr_a or random_heads@<seed>")
    x.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="override the run's params to pick other finished artifacts (repeatable)")
    x.add_argument("--out", type=Path, default=None, help="the folder to write (default RUN_DIR/export/<variant>-<key>)")
    x.add_argument("--format", default="safetensors", choices=["safetensors", "compressed-tensors"],
                   help="compressed-tensors: sparse-bitmask weights (needs the [export] extra)")
    args = ap.parse_args(argv)
    for flag in ("first", "last"):
        v = getattr(args, flag, None)
        if v is not None and not re.fullmatch(r"\d{1,2}", v):
            ap.error(f"--{'from' if flag == 'first' else 'to'} {v!r}: give a notebook number such as 02")
    if args.cmd == "run" and args.first and args.last and int(args.first) > int(args.last):
        ap.error(f"--from {args.first} comes after --to {args.last}")
    try:
        if args.cmd == "toy":
            return toy_command(args)
        if args.cmd == "sweep":
            return sweep_command(args)
        if args.cmd == "course":
            return course_command(args)
        if args.cmd == "book":
            return book_command(args)
        if args.cmd == "export":
            return export_command(args)
        if args.cmd == "params":
            import yaml

            print(yaml.safe_dump(load_params(args.params, args.param).to_dict(), sort_keys=False), end="")
            return EXIT_OK
        return run_pipeline(args.params, args.param, args.first, args.last, args.notebooks, args.verify,
                            tuple(args.force))
    except (ParamsError, InputError, SweepError, ExportError) as err:
        print(f"hsr: {err}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("hsr: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
