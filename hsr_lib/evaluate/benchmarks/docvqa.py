"""DocVQA (Mathew et al., WACV 2021): questions on document images, scored with ANLS (τ = 0.5).

Format (the official Task 1 annotations, e.g. ``val/val_v1.0.json``): ``{"dataset_name",
"dataset_split", "dataset_version", "data": [...]}``, each entry ``{"questionId", "question",
"image": "documents/<name>.png" (relative to the JSON's folder), "docId", "answers": [...], ...}``.
The test split has no ``answers``; use val. The prompt adds LLaVA's short-answer instruction.
"""

from __future__ import annotations

from pathlib import Path

from ...data import DataError, inside_root
from ..items import BenchmarkError, EvalItem, find_data_file, read_json_file

FILES = ("val_v1.0.json", "val_v1.0_withQT.json", "val/val_v1.0.json", "val/val_v1.0_withQT.json")
SHORT_ANSWER = "Answer the question using a single word or phrase."
HOW_TO_GET = ("download DocVQA Task 1 (val: val_v1.0.json and documents/) from rrc.cvc.uab.es/?ch=17 and set "
              "eval.data_roots.docvqa to that folder (or to the JSON file)")


def find_file(root: Path) -> Path:
    """``root`` itself, or the val annotation file inside it."""
    return find_data_file(root, FILES, "DocVQA", HOW_TO_GET)


def load(root: Path, allow_outside: bool = False) -> list[EvalItem]:
    """Read the DocVQA annotations into items with their gold answers."""
    path = find_file(root)
    data = read_json_file(path)
    rows = data.get("data") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows:
        raise BenchmarkError(f"{path}: expected {{\"data\": [...]}} with at least one question")
    items, seen = [], {}
    for n, r in enumerate(rows, 1):
        where = f"{path}: entry {n}"
        if not isinstance(r, dict):
            raise BenchmarkError(f"{where}: expected a JSON object, got {type(r).__name__}")
        if "questionId" not in r:
            raise BenchmarkError(f"{where}: missing key 'questionId'")
        qid = str(r["questionId"])
        where += f" (questionId {qid})"
        for key in ("question", "image"):
            if not isinstance(r.get(key), str) or not r[key].strip():
                raise BenchmarkError(f"{where}: {key!r} must be a non-empty string")
        answers = r.get("answers")
        if answers is None:
            raise BenchmarkError(f"{where}: no 'answers' (the test split has none; use the val split)")
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise BenchmarkError(f"{where}: 'answers' must be a non-empty list of strings")
        try:
            image = inside_root(path.parent, r["image"], where, allow_outside)
        except DataError as e:
            raise BenchmarkError(str(e)) from None
        if qid in seen:
            raise BenchmarkError(f"{where}: duplicate questionId {qid} (first at entry {seen[qid]})")
        seen[qid] = n
        types = r.get("question_types")
        items.append(EvalItem("docvqa", qid, f"{r['question'].strip()}\n{SHORT_ANSWER}", (str(image),), "path", "vqa",
                              category=types[0] if isinstance(types, list) and types else None,
                              answers=tuple(answers), source=where))
    return items
