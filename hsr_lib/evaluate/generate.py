"""Batched greedy generation with left padding, saved as resumable JSONL with integrity.

One file per (variant, benchmark): ``<dir>/<variant>/<benchmark>.jsonl``, one row per item id:
``{benchmark, item_id, variant, prompt, response, n_tokens, config, input, hash}``. ``config``
hashes what every answer of the file depends on (the variant's artifact key and the generation
settings); ``input`` (:func:`answer_key`) is what the model saw for this item: the config, the
question and the image's content; ``hash`` is the row's own hash (:func:`row_hash`). A row is reused
only when its hash holds and its input is the item's; a damaged or edited row, or a file cut off
mid-row, is named in one line and its items generated again, the intact rows kept. The file is
rewritten atomically at most every ``flush_s`` seconds and at the end, so a killed run loses at
most that much work and never leaves a half-written file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..io import atomic_write_jsonl, stable_hash
from ..models import LoadedModel
from ..progress import progress as progress_bar
from ..prompts import encode, prompt_text
from ..runs import say
from .items import EvalItem


def answer_key(item: EvalItem, config: str) -> str:
    """What one answer depends on: the file's ``config`` (variant and generation settings), the item's
    question and its image by content."""
    return stable_hash({"config": config, "question": item.question, "image": item.image_identity()})


def row_hash(row: dict[str, Any]) -> str:
    """The hash a row carries: of every field but ``hash`` itself."""
    return stable_hash({k: v for k, v in row.items() if k != "hash"})


def _some(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def read_answers(path: Path, config: str) -> tuple[dict[str, dict[str, Any]], bool]:
    """The intact rows of ``config`` in an answers file, by item id, and whether anything was dropped
    as damaged (each problem said in one line naming the file: cut off, unreadable line, a row that
    fails its hash, two rows for one item)."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    rows: dict[str, dict[str, Any]] = {}
    bad: list[str] = []
    twice: set[str] = set()
    old = 0
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
            if not isinstance(row, dict) or not isinstance(row.get("item_id"), str):
                raise ValueError("not an answer row")
        except ValueError:
            if n == len(lines):  # no newline at the end: the file stops inside its last row
                say(f"{path}: the file is cut off (line {n} is an incomplete row); its lost answers are generated again")
            else:
                bad.append(f"line {n} (unreadable)")
            continue
        if row.get("config") != config:
            continue  # made for other settings: not this file's business
        iid = row["item_id"]
        if "hash" not in row:
            old += 1
            continue
        if row["hash"] != row_hash(row):
            bad.append(f"item {iid!r} (line {n}: edited or damaged)")
            twice.add(iid)  # never fall back on another row of a damaged item
            continue
        if iid in rows or iid in twice:
            bad.append(f"item {iid!r} (line {n}: a second row)")
            twice.add(iid)
            continue
        rows[iid] = row
    for iid in twice:
        rows.pop(iid, None)
    if bad:
        say(f"{path}: {len(bad)} answer row(s) fail their check: {_some(bad)}; generating them again "
            f"(keeping {len(rows)} intact)")
    if old:
        say(f"{path}: {old} answer row(s) from before answers carried their own hash; generating them again")
    return rows, bool(bad or old) or (bool(data) and not data.endswith(b"\n"))


class ResponseStore:
    """The saved responses of one variant on one benchmark, for one generation config."""

    def __init__(self, path: str | Path, config: str, flush_s: float = 30.0):
        self.path, self.config, self.flush_s = Path(path), config, flush_s
        self.rows: dict[str, dict[str, Any]] = {}
        damaged = False
        if self.path.is_file():
            self.rows, damaged = read_answers(self.path, config)
        self._dirty, self._last = damaged, time.monotonic()

    def missing(self, items: Sequence[EvalItem]) -> list[EvalItem]:
        """Items without an answer to what the model sees now (question, image content, settings)."""
        return [it for it in items if it.id not in self.rows or self.rows[it.id].get("input") != answer_key(it, self.config)]

    def row(self, item: EvalItem, response: str, n_tokens: int, variant: str) -> dict[str, Any]:
        """The saved row of an answer, keyed by what the model saw and carrying its own hash."""
        row = {"benchmark": item.benchmark, "item_id": item.id, "variant": variant, "prompt": item.question,
               "response": response, "n_tokens": n_tokens, "config": self.config,
               "input": answer_key(item, self.config)}
        return {**row, "hash": row_hash(row)}

    def add(self, rows: Sequence[dict[str, Any]]) -> None:
        """Record new rows; flush when ``flush_s`` has passed since the last write."""
        for r in rows:
            self.rows[r["item_id"]] = r
        self._dirty = True
        if time.monotonic() - self._last >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        """Rewrite the file atomically with every row of this config."""
        if self._dirty or not self.path.is_file():
            atomic_write_jsonl(self.path, self.rows.values())
            self._dirty, self._last = False, time.monotonic()

    def ordered(self, items: Sequence[EvalItem]) -> list[dict[str, Any]]:
        """The rows of ``items``, in their order."""
        return [self.rows[it.id] for it in items if it.id in self.rows]


def stop_ids(lm: LoadedModel) -> list[int]:
    """Token ids that end generation: the generation config's EOS ids and the tokenizer's."""
    ids = lm.model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    tok = lm.processor.tokenizer
    return sorted(set(ids) | ({tok.eos_token_id} if tok.eos_token_id is not None else set()))


@torch.no_grad()
def generate_batch(lm: LoadedModel, items: Sequence[EvalItem], max_new_tokens: int) -> list[tuple[str, int]]:
    """Greedy answers (text, number of new tokens) for a batch, left-padded, stopping at EOS."""
    tok = lm.processor.tokenizer
    texts = [prompt_text(lm.processor, it.question, lm.adapter) for it in items]
    enc = encode(lm.processor, texts, [it.load_image() for it in items], lm.device)
    eos = stop_ids(lm)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)
    out = lm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                            eos_token_id=eos or None, pad_token_id=pad)
    new = out[:, enc["input_ids"].shape[1]:]
    result = []
    for row in new.tolist():
        n = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        result.append((tok.decode(row[:n], skip_special_tokens=True).strip(), n))
    return result


def generate_responses(lm: LoadedModel, items: Sequence[EvalItem], variant: str, store: ResponseStore,
                       max_new_tokens: int, batch_size: int, progress: bool = True) -> list[dict[str, Any]]:
    """Answer every item not yet in ``store`` and return all rows of ``items`` in order."""
    todo = store.missing(items)
    bench = items[0].benchmark if items else ""
    with progress_bar(total=len(items), initial=len(items) - len(todo), desc=f"{variant} · {bench}", disable=not progress,
              leave=False) as bar:
        for i in range(0, len(todo), batch_size):
            batch = todo[i:i + batch_size]
            answers = generate_batch(lm, batch, max_new_tokens)
            store.add([store.row(it, text, n, variant) for it, (text, n) in zip(batch, answers)])
            bar.update(len(batch))
    store.flush()
    return store.ordered(items)
