"""Batched greedy generation with left padding, saved as resumable JSONL.

One file per (variant, benchmark): ``<dir>/<variant>/<benchmark>.jsonl``, one row per item:
``{benchmark, item_id, variant, prompt, response, n_tokens, config}``. ``config`` hashes what the
answer depends on (model, dtype, max_new_tokens, the variant's upstream fingerprint); rows of
another config are dropped, rows of this one are kept and not generated again. The file is
rewritten atomically at most every ``flush_s`` seconds and at the end, so a killed run loses at
most that much work and never leaves a half-written file.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..io import atomic_write_jsonl, read_jsonl
from ..models import LoadedModel
from ..progress import progress as progress_bar
from ..prompts import encode, prompt_text
from .items import EvalItem


class ResponseStore:
    """The saved responses of one variant on one benchmark, for one generation config."""

    def __init__(self, path: str | Path, config: str, flush_s: float = 30.0):
        self.path, self.config, self.flush_s = Path(path), config, flush_s
        rows = read_jsonl(self.path) if self.path.is_file() else []
        self.rows: dict[str, dict[str, Any]] = {r["item_id"]: r for r in rows if r.get("config") == config}
        self._dirty, self._last = False, time.monotonic()

    def missing(self, items: Sequence[EvalItem]) -> list[EvalItem]:
        """Items without a response yet (or whose saved prompt differs from the item's)."""
        return [it for it in items if it.id not in self.rows or self.rows[it.id].get("prompt") != it.question]

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
            store.add([{"benchmark": it.benchmark, "item_id": it.id, "variant": variant, "prompt": it.question,
                        "response": text, "n_tokens": n, "config": store.config}
                       for it, (text, n) in zip(batch, answers)])
            bar.update(len(batch))
    store.flush()
    return store.ordered(items)
