"""The run directory (docs/run-directory.md): artifacts of one model on one data set, keyed by what made them.

``<runs_dir>/<run_name>/`` holds ``params.yaml`` (the resolved params of the last start),
``manifest.json`` (package versions, git commit, device, wall time per step key) and one folder
per step, ``<step>/<key>/``, where the key is the step's main settings plus a short hash of
everything that determines it (:class:`Spec`): the params it reads and its upstream artifacts'
fingerprints. Settings therefore coexist, and each is computed once. A step works in
``<step>/.<key>.partial/`` and the folder gets its key only when the step finishes, with a
``_step.json`` marker inside (fingerprint, wall time); a crash leaves the partial folder, whose
saved progress the next attempt resumes from.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shutil
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from .io import atomic_write_json, read_json, stable_hash
from .params import Params, load_params

MARKER = "_step.json"
STEP_NAMES = ("data", "ships", "scores", "prune", "realign", "evaluate")
PATH_KEYS = ("runs_dir", "data.vlguard_root", "data.image_root", "eval.llm_judge_path")
HASH_LEN = 10


@dataclass(eq=False)
class Spec:
    """What determines one keyed artifact folder: the step, a readable label of its main settings,
    the values it ``reads`` (params and input-file fingerprints, never the device) and the specs
    of the ``upstream`` artifacts it reads. ``needs`` are steps that must have run but whose
    content enters through ``reads`` (the data samples). ``params`` and ``runner`` say how to
    make it when it is missing."""

    step: str
    label: str
    reads: Mapping[str, Any]
    upstream: tuple["Spec", ...] = ()
    needs: tuple["Spec", ...] = ()
    params: Params | None = field(default=None, repr=False)
    runner: Callable[..., Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.step not in STEP_NAMES:
            raise KeyError(f"unknown step {self.step!r}; steps: {', '.join(STEP_NAMES)}")

    @cached_property
    def fingerprint(self) -> str:
        return stable_hash({"step": self.step, "reads": self.reads,
                            "upstream": {f"{u.step}/{u.label}": u.fingerprint for u in self.upstream}})

    @property
    def key(self) -> str:
        """The folder name: ``<label>-<hash>``."""
        return f"{self.label}-{self.fingerprint[:HASH_LEN]}"

    @property
    def where(self) -> str:
        """``<step>/<key>``, as messages name it."""
        return f"{self.step}/{self.key}"


def resolve_paths(P: Params, base: str | Path | None = None) -> Params:
    """Make the path-valued params absolute against ``base`` (default: the current directory).

    ``model.name`` becomes absolute only when it names an existing local folder."""
    base = Path(base or Path.cwd())
    d = P.to_dict()

    def fix(v: str | None) -> str | None:
        return v if v is None else str((base / Path(v).expanduser()).resolve())

    for key in PATH_KEYS:
        section, _, name = key.rpartition(".")
        holder = d[section] if section else d
        holder[name] = fix(holder[name])
    d["eval"]["data_roots"] = {k: fix(v) for k, v in d["eval"]["data_roots"].items()}
    if not d["model"]["name"].startswith("tiny:") and (base / d["model"]["name"]).is_dir():
        d["model"]["name"] = fix(d["model"]["name"])
    return load_params(None, overrides=d)


def environment() -> dict[str, Any]:
    """Package versions, git commit and device of this process."""
    import importlib.metadata as md

    import torch

    versions = {"python": platform.python_version()}
    for pkg in ("hsr", "torch", "transformers", "numpy", "safetensors", "papermill"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"
    return {"versions": versions, "git_commit": git_commit(), "device": device, "host": platform.node()}


def git_commit() -> str | None:
    """The commit of the checkout this package runs from (with '+dirty'), or None."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists() or not shutil.which("git"):
        return None
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("+dirty" if dirty else "")) or None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Run:
    """One run directory; open it with :meth:`Run.open`."""

    def __init__(self, params: Params, directory: Path):
        self.params = params
        self.dir = Path(directory)

    @classmethod
    def open(cls, params: Params, base: str | Path | None = None) -> "Run":
        """Create (or reopen) ``<runs_dir>/<run_name>``, write the resolved params and manifest."""
        P = resolve_paths(params, base)
        run = cls(P, Path(P.runs_dir) / P.run_name)
        run.dir.mkdir(parents=True, exist_ok=True)
        P.save(run.params_path)
        manifest = run.manifest()
        manifest.update(environment())
        manifest.setdefault("created", _now())
        manifest["updated"] = _now()
        manifest["fidelity"] = P.fidelity
        manifest.setdefault("steps", {})
        atomic_write_json(run.dir / "manifest.json", manifest)
        return run

    def using(self, params: Params) -> "Run":
        """The same run directory seen with other params (nothing is written)."""
        return Run(params, self.dir)

    @property
    def params_path(self) -> Path:
        return self.dir / "params.yaml"

    def manifest(self) -> dict[str, Any]:
        path = self.dir / "manifest.json"
        return read_json(path) if path.exists() else {}

    def update_manifest(self, section: str, key: str, value: Any) -> None:
        """Set ``manifest[section][key] = value`` atomically."""
        m = self.manifest()
        m.setdefault(section, {})[key] = value
        m["updated"] = _now()
        atomic_write_json(self.dir / "manifest.json", m)

    def path(self, spec: Spec) -> Path:
        """The keyed folder of ``spec`` (it exists once the step has finished)."""
        return self.dir / spec.step / spec.key

    def staging(self, spec: Spec) -> Path:
        """Where the step works until it finishes: ``<step>/.<key>.partial``."""
        return self.dir / spec.step / f".{spec.key}.partial"

    def recorded(self, spec: Spec) -> dict[str, Any]:
        """The marker of the finished folder ({} when there is none)."""
        path = self.path(spec) / MARKER
        return read_json(path) if path.is_file() else {}

    def is_done(self, spec: Spec) -> bool:
        """True when the keyed folder exists, finished, with this fingerprint."""
        return self.recorded(spec).get("fingerprint") == spec.fingerprint

    def keys(self, step: str) -> list[str]:
        """The finished keys of ``step`` in this run directory, sorted."""
        d = self.dir / step
        return sorted(p.name for p in d.iterdir() if (p / MARKER).is_file()) if d.is_dir() else []

    @contextmanager
    def step(self, spec: Spec) -> Iterator[Path]:
        """Run a step's body in its staging folder; on success record the marker and move the
        folder to its key. A failure leaves the staging folder (and its saved progress) behind."""
        stage = self.staging(spec)
        stage.mkdir(parents=True, exist_ok=True)
        (stage / MARKER).unlink(missing_ok=True)
        t0 = time.perf_counter()
        yield stage
        wall = round(time.perf_counter() - t0, 3)
        record = {"step": spec.step, "key": spec.key, "fingerprint": spec.fingerprint, "wall_s": wall,
                  "finished": _now(), "reads": spec.reads,
                  "upstream": {u.step: u.key for u in spec.upstream}}
        atomic_write_json(stage / MARKER, record)
        final = self.path(spec)
        if final.exists():
            shutil.rmtree(final)
        os.replace(stage, final)
        self.update_manifest("steps", spec.where, {"wall_s": wall, "fingerprint": spec.fingerprint,
                                                   "finished": record["finished"]})
