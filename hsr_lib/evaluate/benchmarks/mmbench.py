"""MMBench (Liu et al., 2023): single-choice questions with base64 images, accuracy and
optional circular evaluation.

Format (the official ``mmbench_dev_*.tsv`` files, as read by VLMEvalKit and by OpenGVLab/LAMM
``src/ChEF/scenario/MMBench_dataset.py``): tab-separated, header ``index, question, hint, A, B,
C, D, [E,] answer, category, image, source, l2-category, comment, split``; ``image`` holds a
base64-encoded image, or (VLMEvalKit's TSVs, to save space) the ``index`` of the row whose
image it reuses; empty option cells mean the question has fewer options.

Circular evaluation (MMBench's CircularEval): a question with N options is asked N times with
the options rotated; it is right only if every rotation is answered right. TSVs that already
hold the rotations give them ``index = original + k * 1e6``; otherwise :func:`rotations` makes
them. The prompt is LLaVA's: hint, question, "A. ..." lines and :data:`~..choices.MC_INSTRUCTION`.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from ..choices import mc_prompt
from ..items import BenchmarkError, EvalItem

REQUIRED = ("index", "question", "A", "B", "answer", "image")
OPTION_COLUMNS = ("A", "B", "C", "D", "E", "F", "G", "H", "I")
CIRCULAR = 1_000_000
HOW_TO_GET = ("download an MMBench TSV (e.g. mmbench_dev_en_20231003.tsv from github.com/open-compass/MMBench) "
              "and set eval.data_roots.mmbench to its folder (or to the file)")


def find_file(root: Path) -> Path:
    """``root`` itself, or the one ``*.tsv`` inside it (a dev file is preferred among several)."""
    if root.is_file():
        return root
    tsvs = sorted(root.glob("*.tsv")) if root.is_dir() else []
    dev = [p for p in tsvs if "dev" in p.name.lower()]
    pick = tsvs if len(tsvs) == 1 else dev
    if len(pick) != 1:
        what = "no *.tsv" if not tsvs else f"several TSVs ({', '.join(p.name for p in tsvs)}); name one"
        raise BenchmarkError(f"MMBench: {what} in {str(root)!r}; {HOW_TO_GET}")
    return pick[0]


def _rows(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """Header and (line, row) pairs of a TSV with very long (base64) fields."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            rows = [(reader.line_num, r) for r in reader]
            return list(reader.fieldnames or []), rows
    except (UnicodeDecodeError, csv.Error) as e:
        raise BenchmarkError(f"{path}: not a readable TSV ({e})") from None


def load(root: Path, allow_outside: bool = False) -> list[EvalItem]:
    """Read an MMBench TSV; every row becomes an item (rotations included, grouped by index % 1e6)."""
    del allow_outside  # no image paths here: images are embedded or rendered
    path = find_file(root)
    header, rows = _rows(path)
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        hint = " (a test split has no answers: use a dev TSV)" if missing == ["answer"] else ""
        raise BenchmarkError(f"{path}: MMBench TSV lacks column(s) {', '.join(map(repr, missing))}{hint}")
    images: dict[str, str] = {}
    parsed = []
    for n, (line, r) in enumerate(rows, 1):
        where = f"{path}: row {n} (line {line})"
        if None in r or any(v is None for v in r.values()):
            raise BenchmarkError(f"{where}: expected {len(header)} tab-separated fields")
        index = r["index"].strip()
        if not index.lstrip("-").isdigit():
            raise BenchmarkError(f"{where}: index must be an integer (got {r['index']!r})")
        opts = [(c, r[c].strip()) for c in OPTION_COLUMNS if c in r and r[c].strip() and r[c].strip() != "nan"]
        if [c for c, _ in opts] != list(OPTION_COLUMNS[:len(opts)]) or len(opts) < 2:
            raise BenchmarkError(f"{where}: options must fill columns A, B, ... without gaps (got "
                                 f"{[c for c, _ in opts]})")
        answer = r["answer"].strip()
        if answer not in dict(opts):
            raise BenchmarkError(f"{where}: answer {answer!r} is not one of the options {[c for c, _ in opts]}")
        if not r["question"].strip():
            raise BenchmarkError(f"{where}: question is empty")
        image = r["image"].strip()
        if len(image) > 64:
            images[index] = image
        parsed.append((where, int(index), r, opts, answer, image))
    items = []
    for where, index, r, opts, answer, image in parsed:
        if len(image) <= 64:  # a reference to another row's image
            if image not in images:
                raise BenchmarkError(f"{where}: image is neither base64 data nor the index of a row with an image "
                                     f"(got {image!r})")
            image = images[image]
        hint = r.get("hint", "").strip()
        hint = None if hint in ("", "nan") else hint
        items.append(EvalItem("mmbench", str(index), mc_prompt(r["question"].strip(), opts, hint), (image,),
                              "base64", "mcq", category=r.get("category") or None, options=tuple(opts),
                              answer=answer, group=str(index % CIRCULAR), source=where))
    if not items:
        raise BenchmarkError(f"{path}: MMBench TSV has no rows")
    return items


def rotations(item: EvalItem) -> list[EvalItem]:
    """The item and its N-1 circular shifts of the option texts (ids ``<index>@<k>``)."""
    letters = [k for k, _ in item.options]
    texts = [v for _, v in item.options]
    out = [item]
    gold = texts[letters.index(item.answer)]
    head = item.question[:-len(mc_prompt("", item.options))]  # the hint and question, without the options
    for k in range(1, len(texts)):
        shifted = texts[k:] + texts[:k]
        opts = tuple(zip(letters, shifted))
        out.append(EvalItem(item.benchmark, f"{item.id}@{k}", mc_prompt(head, opts), item.image, item.image_kind,
                            item.kind, item.category, opts, letters[shifted.index(gold)], group=item.group,
                            source=item.source))
    return out


def select(items: list[EvalItem], circular: bool) -> list[EvalItem]:
    """Plain evaluation: the original questions only; circular: every rotation (made when absent)."""
    originals = [it for it in items if it.id == it.group]
    if not circular:
        return originals
    if len(originals) < len(items):  # the TSV holds the rotations already
        return sorted(items, key=lambda it: (int(it.group), int(it.id)))
    return [rot for it in originals for rot in rotations(it)]
