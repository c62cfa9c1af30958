"""What identifies an input (docs/run-directory.md, "What identifies an input"): content, never location.

* :func:`file_hash` — a file's content hash, computed once per file version and cached per machine
  in ``$HSR_CACHE/hashes/`` (keyed by path, size, modification and change time; atomic writes, so
  several processes may share it);
* :func:`model_fingerprint` — a model: ``tiny:`` its build version and seed, ``toy:`` and a local
  folder the bytes of its weight, config, tokenizer, processor and chat-template files, an HF id the
  commit its name resolves to in the local Hugging Face cache;
* :func:`images_fingerprint` — a list of images by content, in order.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterable

from .io import file_hash as _raw_hash
from .io import stable_hash

DISK_MIN = 64 << 10  # files this size or larger have their hash cached on disk (smaller: re-hashing is as cheap)
LOUD_MIN = 512 << 20  # hashing a file this large prints a line (a 7B checkpoint takes seconds per shard)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".npz", ".onnx")
MODEL_FILE_SUFFIXES = (*WEIGHT_SUFFIXES, ".json", ".jinja", ".model", ".tiktoken", ".txt", ".py")
NOT_MODEL_FILES = ("toy_card.json",)  # documentation: the toy's card carries its training time


class IdentityError(ValueError):
    """An input whose identity cannot be established; the message names it."""


def cache_root() -> Path:
    """``$HSR_CACHE`` (default ``~/.cache/hsr``): the toy checkpoints and the hash cache."""
    return Path(os.environ.get("HSR_CACHE") or Path.home() / ".cache" / "hsr")


def hashes_dir() -> Path:
    return cache_root() / "hashes"


def _signature(path: str) -> tuple[str, int, int, int, int]:
    """What says a file is unchanged: absolute path, size, modification and change time, inode. The
    change time catches a replacement that kept the modification time (``cp -p``, ``rsync -a``)."""
    st = os.stat(path)
    return os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def file_hash(path: str | os.PathLike) -> str:
    """A short sha256 of the file's bytes, computed once per file version on this machine."""
    return _hash_of(*_signature(os.fspath(path)))


@functools.lru_cache(maxsize=65536)
def _hash_of(path: str, size: int, mtime_ns: int, ctime_ns: int, ino: int) -> str:
    if size < DISK_MIN:
        return _raw_hash(path)
    sig = [path, size, mtime_ns, ctime_ns, ino]
    name = hashlib.sha256(json.dumps(sig).encode()).hexdigest()[:32]
    entry = hashes_dir() / name[:2] / f"{name}.json"
    try:
        rec = json.loads(entry.read_text())
        if rec.get("signature") == sig and isinstance(rec.get("hash"), str):
            return rec["hash"]
    except (OSError, ValueError):
        pass  # absent, or unreadable (a crash mid-write on a filesystem without ordered renames): re-hash
    if size >= LOUD_MIN:
        print(f"[hsr] hashing {path} ({size / 2**30:.1f} GiB; once on this machine, cached in {hashes_dir()})",
              file=sys.stderr, flush=True)
    digest = _raw_hash(path)
    _store(entry, {"signature": sig, "hash": digest})
    return digest


def _store(entry: Path, rec: dict) -> None:
    """Write a cache entry atomically (temporary file, then rename: a reader sees all or nothing);
    a cache that cannot be written is skipped, never an error."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=f".{entry.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(rec))
            os.replace(tmp, entry)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        pass


def images_fingerprint(paths: Iterable[str | os.PathLike | None]) -> str:
    """The images of a list, in order, by content (a missing file counts as ``None``: the step that
    reads it names it)."""
    return stable_hash([file_hash(p) if p is not None and os.path.isfile(p) else None for p in paths])


def model_files(folder: str | os.PathLike) -> list[Path]:
    """The files that make a saved model: weights, configs, tokenizer, processor and chat template
    (hidden files and folders, READMEs, images and the toy's card are not part of it)."""
    root = Path(folder)
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        if p.suffix.lower() in MODEL_FILE_SUFFIXES and p.name not in NOT_MODEL_FILES:
            out.append(p)
    return out


def folder_fingerprint(folder: str | os.PathLike) -> str:
    """A saved model folder by the content of :func:`model_files` (relative names: a moved or
    copied folder keeps it)."""
    root = Path(folder)
    return stable_hash({str(p.relative_to(root)): file_hash(p) for p in model_files(root)})


def hf_revision(name: str) -> str:
    """The commit an HF id resolves to in the local Hugging Face cache (``refs/main``). Online, a
    model not yet in the cache gets its config downloaded first (which records the commit);
    otherwise an :class:`IdentityError` naming it."""
    from huggingface_hub import try_to_load_from_cache

    def cached() -> str | None:
        try:
            found = try_to_load_from_cache(name, "config.json")
        except ValueError:  # not a valid repo id
            return None
        return Path(found).parent.name if isinstance(found, str) else None

    commit = cached()
    if commit is None and os.environ.get("HF_HUB_OFFLINE", "") in ("", "0"):
        try:
            from huggingface_hub import hf_hub_download

            hf_hub_download(name, "config.json")
        except Exception:  # no network, no such repo, gated: named below
            pass
        commit = cached()
    if commit is None:
        raise IdentityError(f"model.name = {name!r}: not in the local Hugging Face cache, so its revision "
                            f"cannot be known; download it first (hf download {name}), or point model.name "
                            "at a local folder")
    return commit


def is_local_model(name: str) -> bool:
    """True when ``name`` is a local folder (not ``tiny:``/``toy:``, not an HF id)."""
    return not name.startswith(("tiny:", "toy:")) and Path(name).expanduser().is_dir()


def model_fingerprint(name: str, seed: int = 0) -> str:
    """What identifies ``model.name`` by content: ``tiny:<family>`` its build version and ``seed``;
    ``toy:…`` and a local folder the bytes of its model files; an HF id ``hf:<commit>`` of its local
    snapshot. An unknown name raises (``models.ModelError`` / :class:`IdentityError`) naming it."""
    if name.startswith("tiny:"):
        from .tiny import BUILD_VERSION

        return stable_hash({"tiny": name[5:], "build": BUILD_VERSION, "seed": seed})
    if name.startswith("toy:"):
        from .models import _toy

        return folder_fingerprint(_toy(name))
    path = Path(name).expanduser()
    if path.is_dir():
        return folder_fingerprint(path)
    return f"hf:{hf_revision(name)}"


__all__ = ["IdentityError", "file_hash", "folder_fingerprint", "hf_revision", "images_fingerprint", "is_local_model",
           "model_files", "model_fingerprint"]
