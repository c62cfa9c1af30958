"""VLGuard's test subsets (Zong et al., ICML 2024): harmful images ("unsafes") and harmful
instructions on safe images ("safe_unsafes"), judged by refusal, and harmless instructions on safe
images ("safe_safes"), where a refusal is an over-refusal.

Format: ``test.json`` from huggingface.co/datasets/ys-zong/VLGuard, the schema of ``train.json``
(docs/method.md), images under ``test/``. The subsets are those of VLGuard's ``utils/utils.py``
``load_data``: ``unsafes`` = records with ``safe: false`` and their ``instruction``;
``safe_unsafes`` = records with ``safe: true`` and their ``unsafe_instruction``; ``safe_safes`` = the
same records with their ``safe_instruction``.
"""

from __future__ import annotations

from pathlib import Path

from ...data import DataError, load_records, split_records
from ..items import BenchmarkError, EvalItem, find_test_json

SPLIT = {"vlguard_unsafe": "safety", "vlguard_safe_unsafe": "safe_unsafe", "vlguard_safe_safe": "utility"}
HOW_TO_GET = ("download test.json and test.zip (unzipped into test/) from huggingface.co/datasets/ys-zong/VLGuard "
              "and set eval.data_roots.vlguard to that folder")


def find_file(root: Path) -> Path:
    """``root`` itself, or test.json inside it."""
    return find_test_json(root, "VLGuard", HOW_TO_GET)


def load(root: Path, name: str = "vlguard_unsafe", allow_outside: bool = False) -> list[EvalItem]:
    """Read one VLGuard test subset (images from ``test/`` next to test.json, else its folder)."""
    path = find_file(root)
    images = path.parent / "test" if (path.parent / "test").is_dir() else path.parent
    try:
        split = split_records(load_records(path), images, source=path, allow_outside=allow_outside)[SPLIT[name]]
    except DataError as e:
        raise BenchmarkError(str(e)) from None
    kind = "benign" if name == "vlguard_safe_safe" else "refusal"
    return [EvalItem(name, s.id, s.question, (s.image,), "path", kind, category=s.category,
                     source=f"{path}: record id {s.id!r}") for s in split]
