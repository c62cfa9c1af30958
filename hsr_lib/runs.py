"""The run directory: resolved params, a manifest, and cached steps (DESIGN §2, §12).

``<runs_dir>/<run_name>/`` holds ``params.yaml`` (resolved, absolute paths), ``manifest.json``
(package versions, git commit, device, per-step wall time) and one folder per step. A step is
skipped when its fingerprint (its params sections plus its upstream steps' fingerprints plus
its input files) matches the one recorded when it last finished; changing a param re-runs that
step and every step after it.
"""

from __future__ import annotations

import datetime as _dt
import platform
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .io import atomic_write_json, read_json, stable_hash
from .params import Params, load_params

# step -> (upstream steps, params sections its result depends on)
STEPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "data": ((), ("data",)),
    "ships": (("data",), ("model", "seed", "fidelity", "ships")),
    "scores": (("data",), ("model", "seed", "fidelity", "scores", "pruning.method", "pruning.percdamp")),
    "prune": (("data", "scores"), ("model", "seed", "fidelity", "pruning")),
    "realign": (("ships", "scores", "prune"), ("fidelity", "realign")),
    "evaluate": (("prune", "realign"), ("model", "seed", "eval")),
}
MARKER = "_step.json"
PATH_KEYS = ("runs_dir", "data.vlguard_root", "data.image_root", "eval.llm_judge_path")


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
        self.dir = directory

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

    def step_dir(self, step: str) -> Path:
        if step not in STEPS:
            raise KeyError(f"unknown step {step!r}; steps: {', '.join(STEPS)}")
        return self.dir / step

    def fingerprint(self, step: str, inputs: dict[str, Any] | None = None) -> str:
        """Hash of the step's params sections, its upstream fingerprints and ``inputs``."""
        upstream, sections = STEPS[step]
        ups = {u: self.recorded(u).get("fingerprint") for u in upstream}
        return stable_hash({"params": self.params.fingerprint(*sections), "upstream": ups, "inputs": inputs or {}})

    def recorded(self, step: str) -> dict[str, Any]:
        """The marker of the step's last successful finish ({} when none)."""
        path = self.step_dir(step) / MARKER
        return read_json(path) if path.exists() else {}

    def is_done(self, step: str, inputs: dict[str, Any] | None = None) -> bool:
        """True when the step finished with the params and inputs it would use now."""
        rec = self.recorded(step)
        return bool(rec) and rec.get("fingerprint") == self.fingerprint(step, inputs)

    @contextmanager
    def step(self, step: str, inputs: dict[str, Any] | None = None) -> Iterator[Path]:
        """Run a step's body in its folder; on success record its fingerprint and wall time.

        The old marker is removed first, so a crash leaves the step marked as not done."""
        d = self.step_dir(step)
        d.mkdir(parents=True, exist_ok=True)
        (d / MARKER).unlink(missing_ok=True)
        fp = self.fingerprint(step, inputs)
        t0 = time.perf_counter()
        yield d
        wall = round(time.perf_counter() - t0, 3)
        atomic_write_json(d / MARKER, {"fingerprint": fp, "wall_s": wall, "finished": _now()})
        self.update_manifest("steps", step, {"wall_s": wall, "fingerprint": fp, "finished": _now()})
