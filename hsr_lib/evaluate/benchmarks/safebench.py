"""SafeBench (Gong et al., FigStep, 2023): 500 harmful instructions in 10 topics, shown as FigStep
typographic images with FigStep's fixed text prompt.

Format (github.com/ThuCCSLab/FigStep, ``data/question/safebench.csv``): a CSV with the header
``dataset,category_id,task_id,category_name,question,instruction``; ``instruction`` is the
statement rendered on the image (e.g. "Steps to ..."). Item ids follow FigStep's image names:
``<dataset>_<category_id>_<task_id>`` (``query_ForbidQI_1_1_6.png`` is ``ForbidQI_1_1``).
The images are rendered here (:mod:`hsr_lib.evaluate.figstep`), not read from FigStep's PNGs.
"""

from __future__ import annotations

import csv
from pathlib import Path

from ..figstep import FIGSTEP_PROMPT
from ..items import BenchmarkError, EvalItem, find_data_file

COLUMNS = ("dataset", "category_id", "task_id", "category_name", "question", "instruction")
FILES = ("safebench.csv", "question/safebench.csv", "data/question/safebench.csv")
HOW_TO_GET = ("get data/question/safebench.csv from github.com/ThuCCSLab/FigStep and set "
              "eval.data_roots.safebench to its folder (or to the file)")


def find_file(root: Path) -> Path:
    """The SafeBench CSV: ``root`` itself, or safebench.csv inside it (FigStep's layout too)."""
    return find_data_file(root, FILES, "SafeBench", HOW_TO_GET)


def load(root: Path, allow_outside: bool = False) -> list[EvalItem]:
    """Read the SafeBench CSV into FigStep items (image rendered from ``instruction``)."""
    del allow_outside  # no image paths here: images are embedded or rendered
    path = find_file(root)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise BenchmarkError(f"{path}: SafeBench CSV lacks column(s) {', '.join(map(repr, missing))} "
                                     f"(header: {reader.fieldnames})")
            rows = [(reader.line_num, r) for r in reader]
    except UnicodeDecodeError as e:
        raise BenchmarkError(f"{path}: not UTF-8 text ({e})") from None
    items: list[EvalItem] = []
    seen: dict[str, str] = {}
    for n, (line, r) in enumerate(rows, 1):
        where = f"{path}: row {n} (line {line})"
        if None in r or any(r[c] is None for c in COLUMNS):
            raise BenchmarkError(f"{where}: expected {len(COLUMNS)} fields, got a different number")
        for c in ("category_id", "task_id"):
            if not r[c].strip().isdigit():
                raise BenchmarkError(f"{where}: {c} must be an integer (got {r[c]!r})")
        if not r["instruction"].strip():
            raise BenchmarkError(f"{where}: instruction is empty")
        iid = f"{r['dataset'].strip()}_{int(r['category_id'])}_{int(r['task_id'])}"
        if iid in seen:
            raise BenchmarkError(f"{where}: duplicate item {iid!r} (first at {seen[iid].split(': ', 1)[1]})")
        seen[iid] = where
        items.append(EvalItem("safebench", iid, FIGSTEP_PROMPT, (r["instruction"].strip(),), "figstep", "refusal",
                              category=r["category_name"].strip() or None, source=where))
    if not items:
        raise BenchmarkError(f"{path}: SafeBench CSV has no rows")
    return items
