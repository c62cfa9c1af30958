"""Atomic artifact writes (JSON, JSONL, CSV, text, bytes) and content hashing."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()


def honour_umask(path: str | os.PathLike) -> None:
    """Give a file made by ``tempfile`` (mode 0600) the mode a plain ``open`` would: 0666 & ~umask."""
    os.chmod(path, 0o666 & ~UMASK)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``
    (the file gets the mode the umask gives, not tempfile's 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        honour_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON atomically (keys keep their insertion order)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> Path:
    """Write one JSON object per line atomically."""
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """Read a JSON-lines file (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def stable_hash(obj: Any) -> str:
    """A short sha256 of ``obj``'s canonical JSON (sorted keys): equal content, equal hash."""
    blob = json.dumps(obj, sort_keys=True, default=str, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def file_hash(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """A short sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


HASH_CACHE_MIN = 64 << 10  # files this size or larger have their hash cached on disk (smaller: re-hashing is as cheap)
LOUD_MIN = 512 << 20  # hashing a file this large prints a line (a 7B checkpoint takes seconds per shard)


def cache_root() -> Path:
    """``$HSR_CACHE`` (default ``~/.cache/hsr``): the toy checkpoints and the hash cache."""
    return Path(os.environ.get("HSR_CACHE") or Path.home() / ".cache" / "hsr")


def hashes_dir() -> Path:
    """The content-hash cache, ``$HSR_CACHE/hashes/`` (one small JSON file per file version)."""
    return cache_root() / "hashes"


def cached_file_hash(path: str | os.PathLike) -> str:
    """:func:`file_hash`, computed once per file version on this machine: cached in this process and,
    for files of :data:`HASH_CACHE_MIN` bytes or more, in :func:`hashes_dir`, keyed by the absolute
    path, size, modification and change time and inode (the change time catches a replacement that
    kept the modification time, as ``cp -p`` or ``rsync -a`` leave it). Safe for concurrent processes."""
    st = os.stat(path)
    return _hash_of(os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


@functools.lru_cache(maxsize=65536)
def _hash_of(path: str, size: int, mtime_ns: int, ctime_ns: int, ino: int) -> str:
    if size < HASH_CACHE_MIN:
        return file_hash(path)
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
    digest = file_hash(path)
    _store(entry, {"signature": sig, "hash": digest})
    return digest


def _store(entry: Path, rec: dict) -> None:
    """Write a cache entry atomically (temporary file, then rename: a reader sees all or nothing;
    no fsync: a lost entry is only re-hashed); a cache that cannot be written is skipped, never an error."""
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
