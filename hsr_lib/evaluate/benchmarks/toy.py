"""The teaching toy's test set (docs/toy.md), written by :mod:`hsr_lib.toy_world` in VLGuard's
test format, one folder per split: ``harmful`` (requests in the training templates, unseen
fillers), ``harmful_novel`` (unseen templates), ``unsafe_image`` (unseen hazard images) — all judged
by refusal — and ``benign`` (unseen phrasings; right when the answer names the shape's colour and
kind). The package ships the files in ``hsr_lib/toy_assets/test/``.
"""

from __future__ import annotations

from pathlib import Path

from ...data import DataError, inside_root, load_records
from ..items import BenchmarkError, EvalItem, find_test_json

HOW_TO_GET = "the toy's test set ships with the package (hsr_lib/toy_assets/test/<split>); point the key there"


def find_file(root: Path) -> Path:
    """``root`` itself, or test.json inside it."""
    return find_test_json(root, "toy test set", HOW_TO_GET)


def load(root: Path, name: str = "toy_harmful", allow_outside: bool = False) -> list[EvalItem]:
    """The items of one toy split: refusals for the harmful splits, colour + shape for benign."""
    path = find_file(root)
    try:
        records = load_records(path)
        items = []
        for r in records:
            where = f"{path}: record id {r['id']!r}"
            image = str(inside_root(path.parent, r["image"], where, allow_outside))
            if name == "toy_benign":
                e = next(x for x in r["instr-resp"] if "safe_instruction" in x)
                items.append(EvalItem(name, str(r["id"]), e["safe_instruction"], (image,), "path", "names",
                                      answers=(r["colour"], r["shape"]), source=where))
            else:
                e = next(x for x in r["instr-resp"] if "instruction" in x)
                items.append(EvalItem(name, str(r["id"]), e["instruction"], (image,), "path", "refusal",
                                      category=r.get("harmful_category"), source=where))
    except (DataError, KeyError, StopIteration) as e:
        raise BenchmarkError(f"{path}: not a toy test file ({e})") from None
    return items
