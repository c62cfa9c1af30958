"""The run directory (docs/run-directory.md): artifacts of one model on one data set, keyed by what made them.

``<runs_dir>/<run_name>/`` holds ``params.yaml`` (the resolved params of the last start),
``manifest.json`` (package versions, git commit, device, wall time per step key) and one folder
per step, ``<step>/<key>/``, where the key is the step's main settings plus a short hash of
everything that determines it (:class:`Spec`): the params it reads and its upstream artifacts'
fingerprints. Settings therefore coexist, and each is computed once. A step works in
``<step>/.<key>.partial/`` and the folder gets its key only when the step finishes, with a
``_step.json`` marker inside (fingerprint, wall time, and the size, modification time and content
hash of every artifact); a crash leaves the partial folder, whose saved progress the next attempt
resumes from.

Trust (docs/run-directory.md): a finished folder counts as done only while its artifacts are the ones its
marker lists: a missing file or another size is a mismatch, another modification time is
re-hashed, and ``verify=True`` (``hsr run --verify``) re-hashes everything; a mismatch is named and
the step recomputed. ``force`` names steps to recompute once in this invocation. One writer per
key: computing a key holds a lock beside its folder (the holder's pid, host and start time are
kept for the message another writer gets); a lock whose holder died is taken over with a message.
``params.yaml`` and the manifest are written only when a step has actually run.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import functools
import os
import platform
import shutil
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
import sys
from typing import Any, Callable, Iterator, Mapping

from .io import atomic_write_json, file_hash, read_json, stable_hash
from .params import Params, resolve_paths

MARKER = "_step.json"
STEP_NAMES = ("data", "ships", "scores", "prune", "realign", "evaluate")  # in order: notebook i runs STEP_NAMES[i - 1]
HASH_LEN = 10
EXPORTS = ("model",)  # folders that export a result (an HF model directory): rebuilt from the artifacts, not hashed


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


VERSIONED = ("torch", "transformers")  # a step reused under other versions of these is reported (not re-keyed)


def versions() -> dict[str, str | None]:
    """The versions of python and of the packages that compute artifacts."""
    return dict(_versions())


@functools.lru_cache(maxsize=1)
def _versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("hsr", "torch", "transformers", "numpy", "safetensors", "papermill"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def environment() -> dict[str, Any]:
    """Package versions, git commit and device of this process."""
    import torch

    versions_ = versions()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"
    lock = Path(__file__).resolve().parent.parent / "requirements.lock"
    return {"versions": versions_, "git_commit": git_commit(), "device": device, "host": platform.node(),
            "requirements_lock": file_hash(lock) if lock.is_file() else None}


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


def new_token() -> str:
    """A token naming one invocation (host, pid, time): ``force`` recomputes a step once per token."""
    return f"{platform.node()}-{os.getpid()}-{time.time_ns()}"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class LockHeld(RuntimeError):
    """Another process is computing the same keyed folder."""


_SAID: set[str] = set()  # integrity messages already printed by this process
_EVENTS: list[str | None] = [None]  # the file say() also appends to (use_events)
_HASHED: set[tuple[str, int, int, str]] = set()  # (path, size, mtime, hash) this process has re-hashed and found equal


def say(message: str) -> None:
    """Print ``[hsr] message`` once per process: what the run directory did that a user must hear of
    (an integrity failure and its recompute, a missing marker, a lock taken over, staging cleaned,
    answers regenerated). Under ``hsr run`` / ``hsr sweep`` (:func:`use_events`) the line is also
    appended to a file the command reads back, so it is said on the terminal, not only in a notebook."""
    if message in _SAID:
        return
    _SAID.add(message)
    print(f"[hsr] {message}", flush=True)
    events = _EVENTS[0]
    if events:
        try:
            with open(events, "a", encoding="utf-8") as f:  # one short append per line: whole under O_APPEND
                f.write(f"[hsr] {message}".replace("\n", " ") + "\n")
        except OSError:
            pass  # the line was printed; the terminal copy is best effort


def use_events(path: str | os.PathLike | None) -> None:
    """Append every later :func:`say` line of this process to ``path`` too (None: stop). ``hsr run``
    passes it to its kernels (``run_options``), ``hsr sweep`` to its workers."""
    _EVENTS[0] = None if path is None else str(path)


class Events:
    """The lines the run directory's code said (:func:`say`) in kernels and worker processes, read
    back from their file (:func:`use_events`) and repeated on stderr after each notebook or wave."""

    def __init__(self, path: Path):
        self.path, self.offset, self.said = path, 0, set()
        path.unlink(missing_ok=True)

    def flush(self) -> None:
        """Print the lines written since the last call, each once, on stderr."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return
        whole = data[:data.rfind(b"\n") + 1]  # a line still being written waits for the next call
        self.offset += len(whole)
        for line in whole.decode("utf-8", "replace").splitlines():
            if line not in self.said:
                self.said.add(line)
                print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        self.flush()
        self.path.unlink(missing_ok=True)


class Run:
    """One run directory; open it with :meth:`Run.open`.

    ``verify`` re-hashes every artifact before trusting it; ``force`` holds step names (or 'all')
    to recompute once in this invocation (``token`` identifies the invocation; a new one by
    default). ``hsr run`` passes them to its notebooks as papermill parameters (``run_options``),
    which hand them to :func:`hsr_lib.notebook.start`."""

    def __init__(self, params: Params, directory: Path, verify: bool = False, force: tuple[str, ...] = (),
                 token: str | None = None):
        bad = [f for f in force if f != "all" and f not in STEP_NAMES]
        if bad:
            raise ValueError(f"force: {bad[0]!r} is not a step; give {', '.join(STEP_NAMES)} or all")
        self.params = params
        self.dir = Path(directory)
        self.verify = bool(verify)
        self.force = tuple(force)
        self.token = token or new_token()

    @classmethod
    def open(cls, params: Params, base: str | Path | None = None, *, verify: bool = False,
             force: tuple[str, ...] = (), token: str | None = None) -> "Run":
        """``<runs_dir>/<run_name>`` for ``params`` (created when missing), with this invocation's
        options (see :class:`Run`); nothing else is written until a step runs."""
        resolved = resolve_paths(params, base)
        run = cls(resolved, Path(resolved.runs_dir) / resolved.run_name, verify, tuple(force), token)
        run.dir.mkdir(parents=True, exist_ok=True)
        return run

    def using(self, params: Params) -> "Run":
        """The same run directory seen with other params (nothing is written)."""
        return Run(params, self.dir, self.verify, self.force, self.token)

    @property
    def params_path(self) -> Path:
        return self.dir / "params.yaml"

    def manifest(self) -> dict[str, Any]:
        path = self.dir / "manifest.json"
        return read_json(path) if path.exists() else {}

    def path(self, spec: Spec) -> Path:
        """The keyed folder of ``spec`` (it exists once the step has finished)."""
        return self.dir / spec.step / spec.key

    def staging(self, spec: Spec) -> Path:
        """Where the step works until it finishes: ``<step>/.<key>.partial``."""
        return self.dir / spec.step / f".{spec.key}.partial"

    def recorded(self, spec: Spec) -> dict[str, Any]:
        """The marker of the finished folder ({} when there is none, or when it is unreadable)."""
        path = self.path(spec) / MARKER
        try:
            return read_json(path) if path.is_file() else {}
        except (OSError, ValueError):
            return {}

    def problem(self, spec: Spec) -> str | None:
        """Why ``spec``'s folder cannot be used as it is (None when it can)."""
        rec = self.recorded(spec)
        if not rec:
            return "not computed"
        if rec.get("fingerprint") != spec.fingerprint:
            return "made with other inputs"
        if (spec.step in self.force or "all" in self.force) and rec.get("invocation") != self.token:
            return "forced"
        folder = self.path(spec)
        for name, (size, mtime_ns, digest) in rec.get("files", {}).items():
            path = folder / name
            try:
                st = path.stat()
            except OSError:
                return f"{path} is missing"
            if st.st_size != size:
                return f"{path} changed since it was written ({st.st_size} bytes, {size} recorded)"
            seen = (str(path), st.st_size, st.st_mtime_ns, digest)
            if (self.verify or st.st_mtime_ns != mtime_ns) and seen not in _HASHED:
                if file_hash(path) != digest:
                    return f"{path} changed since it was written (its content hash differs)"
                _HASHED.add(seen)  # a large artifact is re-hashed once per process, not at every check
        return None

    def is_done(self, spec: Spec) -> bool:
        """True when the keyed folder finished with this fingerprint and its artifacts are intact.
        A finished folder that fails a check is named in a printed line (it will be recomputed)."""
        why = self.problem(spec)
        if why == "not computed" and self.path(spec).is_dir():
            marker = self.path(spec) / MARKER
            state = "is unreadable" if marker.exists() else "is missing"
            say(f"{spec.where}: {MARKER} {state}, so the folder is not known to be complete; recomputing it")
            return False
        if why is None:
            self._note_versions(spec)
        if why in (None, "not computed", "made with other inputs"):
            return why is None
        say(f"{spec.where}: {why}; recomputing it")
        return False

    def _note_versions(self, spec: Spec) -> None:
        """One line when a reused step was computed under other versions of torch or transformers."""
        then, now = self.recorded(spec).get("versions") or {}, versions()
        old = [k for k in VERSIONED if k in then and then[k] != now.get(k)]
        if old:
            say(f"{spec.where}: computed under {', '.join(f'{k} {then[k]}' for k in old)} (now "
                 f"{', '.join(f'{k} {now.get(k)}' for k in old)}); reused as it is (--force {spec.step} recomputes it)")

    def keys(self, step: str) -> list[str]:
        """The finished keys of ``step`` in this run directory, sorted."""
        d = self.dir / step
        return sorted(p.name for p in d.iterdir() if (p / MARKER).is_file()) if d.is_dir() else []

    @contextmanager
    def lock(self, spec: Spec) -> Iterator[None]:
        """Hold the one-writer lock of ``spec``'s key; :class:`LockHeld` naming the holder when
        another live process holds it. A lock left by a dead holder is taken over with a message."""
        from filelock import FileLock, Timeout

        folder = self.dir / spec.step
        folder.mkdir(parents=True, exist_ok=True)
        holder = folder / f".{spec.key}.holder.json"
        lock = FileLock(str(folder / f".{spec.key}.lock"), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            try:
                h = read_json(holder)
                who = f"pid {h['pid']} on {h['host']} since {h['since']}"
            except (OSError, ValueError, KeyError):
                who = "another process"
            raise LockHeld(f"{spec.where} is being computed by {who} (lock {folder / f'.{spec.key}.lock'})") from None
        try:
            if holder.is_file():
                try:
                    h = read_json(holder)
                    say(f"{spec.where}: taking over the lock of pid {h.get('pid')} on {h.get('host')} "
                         f"(since {h.get('since')}), which ended without releasing it")
                except (OSError, ValueError):
                    pass
            atomic_write_json(holder, {"pid": os.getpid(), "host": platform.node(), "since": _now()})
            yield
        finally:
            holder.unlink(missing_ok=True)
            lock.release()

    def clean_staging(self, spec: Spec, keep: tuple[str, ...] = ()) -> None:
        """Remove from ``spec``'s staging folder everything but the files matching ``keep`` (glob
        patterns relative to it, e.g. ``layers/layer_*.json``: what the step resumes from), each
        removal named in a line: a stray file there would otherwise be promoted with the artifacts."""
        stage = self.staging(spec)

        def walk(folder: Path) -> None:
            for p in sorted(folder.iterdir()):
                rel = p.relative_to(stage).as_posix()
                if p.is_dir() and not p.is_symlink():
                    if any(k.startswith(rel + "/") for k in keep):
                        walk(p)
                        continue
                    shutil.rmtree(p)
                elif any(fnmatch.fnmatchcase(rel, k) for k in keep):
                    continue
                else:
                    p.unlink()
                say(f"{spec.where}: removed {rel!r} from its staging folder {stage.name} (not something this "
                    "step resumes from)")

        if stage.is_dir():
            walk(stage)

    @contextmanager
    def step(self, spec: Spec, keep: tuple[str, ...] = ()) -> Iterator[Path]:
        """Run a step's body in its staging folder, holding its key's lock; on success record the
        marker (with every artifact's size, modification time and hash) and move the folder to its
        key, then record the params and the manifest. A staging folder left by an earlier attempt
        keeps only what ``keep`` matches (:meth:`clean_staging`). A failure leaves the staging folder
        (and its saved progress) behind and the finished folder, params and manifest untouched."""
        with self.lock(spec):
            stage = self.staging(spec)
            (stage / MARKER).unlink(missing_ok=True)
            self.clean_staging(spec, keep)
            stage.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            yield stage
            wall = round(time.perf_counter() - t0, 3)
            files = {}
            for path in sorted(p for p in stage.rglob("*") if p.is_file() and p.name != MARKER
                               and p.relative_to(stage).parts[0] not in EXPORTS):
                st = path.stat()
                files[str(path.relative_to(stage))] = [st.st_size, st.st_mtime_ns, file_hash(path)]
            record = {"step": spec.step, "key": spec.key, "fingerprint": spec.fingerprint, "wall_s": wall,
                      "finished": _now(), "invocation": self.token, "reads": spec.reads,
                      "upstream": {u.step: u.key for u in spec.upstream}, "files": files,
                      "versions": versions(), "git_commit": git_commit()}
            atomic_write_json(stage / MARKER, record)
            final = self.path(spec)
            if final.exists():
                shutil.rmtree(final)
            os.replace(stage, final)
        self.record_run(spec.where, {"wall_s": wall, "fingerprint": spec.fingerprint, "finished": record["finished"]})

    def record_notebook(self, name: str, entry: dict[str, Any]) -> None:
        """The manifest's entry of an executed notebook (the runner calls this after each one)."""
        m = self.manifest()
        m.setdefault("notebooks", {})[name] = entry
        m["updated"] = _now()
        atomic_write_json(self.dir / "manifest.json", m)

    def record_run(self, where: str, entry: dict[str, Any]) -> None:
        """After a step ran: the params it ran with, and the manifest (environment, the step's entry)."""
        self.params.save(self.params_path)
        m = self.manifest()
        m.update(environment())
        m.setdefault("created", _now())
        m["fidelity"] = self.params.fidelity
        m.setdefault("steps", {})[where] = entry
        m["updated"] = _now()
        atomic_write_json(self.dir / "manifest.json", m)
