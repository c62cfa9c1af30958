"""VLGuard loading, the three splits (safety / utility / safe-unsafe) and seeded sampling.

See docs/method.md. ``train.json`` is a list of records ``{id, image, safe, harmful_category?,
harmful_subcategory?, instr-resp}``; every bad input stops with a :class:`DataError` that names
the record and the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence, TypeVar

import numpy as np
from PIL import Image

from hsr_lib.io import atomic_write_jsonl, read_jsonl

T = TypeVar("T")

SPLITS: tuple[str, ...] = ("safety", "utility", "safe_unsafe")
_HOW_TO_GET = (
    "Download VLGuard from the Hugging Face dataset ys-zong/VLGuard (train.json plus the train "
    "images), or set `data.vlguard_root: null` in the params to use the synthetic VLGuard-shaped set."
)


class DataError(ValueError):
    """Bad or missing data: the message names the file, record and key at fault."""


@dataclass(frozen=True)
class Sample:
    """One (image, question, response) example; ``image`` is an absolute path string."""

    id: str
    question: str
    response: str
    image: str
    category: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Sample":
        """Inverse of :meth:`to_dict` (unknown keys are an error)."""
        extra = set(d) - {"id", "question", "response", "image", "category"}
        if extra:
            raise DataError(f"Sample.from_dict: unknown keys {sorted(extra)}")
        try:
            return cls(
                id=str(d["id"]),
                question=d["question"],
                response=d["response"],
                image=d["image"],
                category=d.get("category"),
            )
        except KeyError as e:
            raise DataError(f"Sample.from_dict: missing key {e.args[0]!r} in {d!r}") from None


def resolve_vlguard(
    vlguard_root: str | os.PathLike,
    train_json: str | os.PathLike = "train.json",
    image_root: str | os.PathLike | None = None,
) -> tuple[Path, Path]:
    """Return ``(train_json_path, image_root)``; train.json may be absolute or relative to the root.

    The image root is ``image_root`` if given, else ``root/"train"`` if that folder exists,
    else the root itself.
    """
    root = Path(vlguard_root).expanduser()
    if not root.is_dir():
        raise DataError(f"VLGuard root {str(root)!r} does not exist or is not a folder. {_HOW_TO_GET}")
    tj = Path(train_json).expanduser()
    tj = tj if tj.is_absolute() else root / tj
    if not tj.is_file():
        raise DataError(f"VLGuard train.json not found at {str(tj)!r}. {_HOW_TO_GET}")
    if image_root is not None:
        img = Path(image_root).expanduser()
        img = img if img.is_absolute() else root / img
        if not img.is_dir():
            raise DataError(f"VLGuard image root {str(img)!r} does not exist. {_HOW_TO_GET}")
    else:
        img = root / "train" if (root / "train").is_dir() else root
    return tj.resolve(), img.resolve()


def _where(rec: Any, index: int, path: Path) -> str:
    rid = rec.get("id") if isinstance(rec, dict) else None
    who = f"record id {rid!r}" if isinstance(rid, (str, int)) and str(rid) else f"record #{index}"
    return f"{who} in {str(path)!r}"


def _check_str(d: dict, key: str, where: str, what: str) -> None:
    if key not in d:
        raise DataError(f"{where}: {what} is missing key {key!r}")
    if not isinstance(d[key], str) or not d[key].strip():
        raise DataError(f"{where}: {what} key {key!r} must be a non-empty string, got {d[key]!r}")


def _find_entry(entries: list, key: str, where: str) -> dict:
    """The single instr-resp entry that has ``key``, with its response validated."""
    hits = [e for e in entries if isinstance(e, dict) and key in e]
    if not hits:
        raise DataError(f"{where}: instr-resp has no entry with key {key!r}")
    if len(hits) > 1:
        raise DataError(f"{where}: instr-resp has {len(hits)} entries with key {key!r}, expected one")
    _check_str(hits[0], key, where, f"the {key!r} entry of instr-resp")
    _check_str(hits[0], "response", where, f"the {key!r} entry of instr-resp")
    return hits[0]


def _validate(rec: Any, index: int, path: Path) -> None:
    where = _where(rec, index, path)
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for key in ("id", "image", "safe", "instr-resp"):
        if key not in rec:
            raise DataError(f"{where}: missing key {key!r}")
    if not isinstance(rec["id"], (str, int)) or isinstance(rec["id"], bool) or not str(rec["id"]).strip():
        raise DataError(f"{where}: key 'id' must be a non-empty string, got {rec['id']!r}")
    _check_str(rec, "image", where, "the record")
    if not isinstance(rec["safe"], bool):
        raise DataError(f"{where}: key 'safe' must be true or false, got {rec['safe']!r}")
    for opt in ("harmful_category", "harmful_subcategory"):
        if rec.get(opt) is not None and not isinstance(rec[opt], str):
            raise DataError(f"{where}: key {opt!r} must be a string or absent, got {rec[opt]!r}")
    entries = rec["instr-resp"]
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{where}: key 'instr-resp' must be a non-empty list, got {entries!r}")
    if rec["safe"]:
        _find_entry(entries, "safe_instruction", where)
        _find_entry(entries, "unsafe_instruction", where)
    else:
        _find_entry(entries, "instruction", where)


def load_records(train_json: str | os.PathLike) -> list[dict]:
    """Read and validate a VLGuard ``train.json`` (a JSON list of records)."""
    path = Path(train_json)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DataError(f"train.json not found at {str(path)!r}. {_HOW_TO_GET}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(data, list):
        raise DataError(f"{str(path)!r} must hold a JSON list of records, got {type(data).__name__}")
    first: dict[str, int] = {}
    for i, rec in enumerate(data):
        _validate(rec, i, path)
        rid = str(rec["id"])
        if rid in first:  # ids key the samples, the answers and the scores: one record each
            raise DataError(f"record id {rid!r} appears twice in {str(path)!r}: record #{first[rid]} and record #{i}; "
                            "ids must be unique")
        first[rid] = i
    return data


def inside_root(root: str | os.PathLike, relative: str, where: str, allow_outside: bool = False) -> Path:
    """``root / relative`` after checking that it exists and, symlinks resolved, lies inside
    ``root`` (unless ``allow_outside``); a DataError naming ``where`` and the path otherwise."""
    root = Path(root).resolve()
    path = root / relative
    if not path.is_file():
        raise DataError(f"{where}: image file not found: {str(path)!r}")
    if not allow_outside and not path.resolve().is_relative_to(root):
        raise DataError(f"{where}: image path {relative!r} resolves outside its root {str(root)!r} "
                        f"(to {str(path.resolve())!r}); set data.allow_outside_root: true to accept it")
    return path


def split_records(
    records: Sequence[dict], image_root: str | os.PathLike, source: str | os.PathLike | None = None,
    allow_outside: bool = False,
) -> dict[str, list[Sample]]:
    """Split validated records into ``safety`` / ``utility`` / ``safe_unsafe`` (train.json order).

    ``source`` (the train.json path) is only used in error messages; an image path that does not
    resolve inside ``image_root`` is refused unless ``allow_outside``.
    """
    root = Path(image_root).resolve()
    src = str(source) if source is not None else "train.json"
    out: dict[str, list[Sample]] = {k: [] for k in SPLITS}
    for rec in records:
        rid = str(rec["id"])
        img = inside_root(root, rec["image"], f"record id {rid!r} in {src!r}", allow_outside)
        cat = rec.get("harmful_category")
        entries = rec["instr-resp"]

        def pick(key: str) -> dict:
            return next(e for e in entries if isinstance(e, dict) and key in e)

        if rec["safe"]:
            e = pick("safe_instruction")
            out["utility"].append(Sample(rid, e["safe_instruction"], e["response"], str(img), cat))
            e = pick("unsafe_instruction")
            out["safe_unsafe"].append(Sample(rid, e["unsafe_instruction"], e["response"], str(img), cat))
        else:
            e = pick("instruction")
            out["safety"].append(Sample(rid, e["instruction"], e["response"], str(img), cat))
    for name, items in out.items():
        if not items:
            raise DataError(f"split {name!r} is empty: {src!r} has no records for it")
    return out


def sample_indices(n_total: int, n: int, seed: int) -> np.ndarray:
    """``numpy.random.default_rng(seed).permutation(n_total)[:n]`` (the released code's shuffle)."""
    if int(n) < 1:
        raise DataError(f"sample size n must be >= 1, got {n}")
    if int(n_total) < 0:
        raise DataError(f"n_total must be >= 0, got {n_total}")
    return np.random.default_rng(seed).permutation(int(n_total))[: int(n)]


def sample(items: Sequence[T], n: int, seed: int) -> list[T]:
    """The seeded sample of ``n`` items (all of them, shuffled, when ``n > len(items)``)."""
    return [items[int(i)] for i in sample_indices(len(items), n, seed)]


def open_image(path: str | os.PathLike, record_id: str | None = None) -> Image.Image:
    """Open an image fully loaded as RGB; a missing or unreadable file raises :class:`DataError`."""
    who = f"record id {record_id!r}: " if record_id is not None else ""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{who}image file not found: {str(path)!r}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{who}cannot read image {str(path)!r}: {e}") from None


def check_images(samples: Iterable[Sample]) -> int:
    """Open every sample's image; raise on the first bad one. Returns the number checked."""
    n = 0
    for s in samples:
        open_image(s.image, s.id)
        n += 1
    return n


def save_samples(path: str | os.PathLike, samples: Iterable[Sample], root: str | os.PathLike | None = None) -> Path:
    """Write samples as JSONL (atomic); with ``root``, image paths inside it are stored relative to
    it, so the file stays valid when its data root (or the run directory holding it) moves."""
    def row(s: Sample) -> dict[str, Any]:
        d = s.to_dict()
        if root is not None and Path(s.image).is_relative_to(root):
            d["image"] = str(Path(s.image).relative_to(root))
        return d
    return atomic_write_jsonl(path, (row(s) for s in samples))


def load_samples(path: str | os.PathLike, root: str | os.PathLike | None = None) -> list[Sample]:
    """Read samples written by :func:`save_samples`; relative image paths are resolved against ``root``."""
    out = []
    for d in read_jsonl(path):
        if root is not None and not Path(d.get("image", "")).is_absolute():
            d = {**d, "image": str(Path(root) / d["image"])}
        out.append(Sample.from_dict(d))
    return out


def sample_size(n: int | str, available: int, key: str, split: str) -> int:
    """The number of records a sample draws: ``n``, or every one for 'all'; more than the split holds
    is an error naming the key and the split's size."""
    if n == "all":
        return available
    if n > available:
        raise DataError(f"{key} = {n} but the {split} split has only {available} records; lower it, or set "
                        f"{key}: all to take every record")
    return int(n)
