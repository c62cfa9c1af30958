"""Every bad input named before any notebook starts (docs/run-directory.md): cheap checks, in well under
a second, of what the steps a command will run are going to read. Each problem is one line that
names the key, file, record or path (:class:`InputError`; ``hsr`` exits with 2)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable

from .data import DataError, load_records, resolve_vlguard, sample_size, split_records
from .params import Params
from .runs import STEP_NAMES

STEP_OF_NOTEBOOK = dict(enumerate(STEP_NAMES, start=1))  # notebook 01 runs the first step, …, 06 the evaluation
_HF_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class InputError(ValueError):
    """A bad input found before any step ran."""


def steps_for(notebook_numbers: Iterable[int]) -> set[str]:
    """The steps a set of notebooks may run: each notebook's own and, run alone, its upstream ones
    (evaluation only when notebook 06 is among them)."""
    nums = list(notebook_numbers)
    top = max((n for n in nums if n < 6), default=0)
    out = {STEP_OF_NOTEBOOK[n] for n in range(1, top + 1)}
    if 6 in nums:
        out |= set(STEP_OF_NOTEBOOK.values())
    return out


def check(P: Params, steps: set[str]) -> None:
    """Raise :class:`InputError` for the first bad input the ``steps`` would meet."""
    check_runs_dir(P)
    check_model(P.model.name)
    if steps & set(STEP_NAMES):
        check_data(P)
    if "evaluate" in steps:
        check_eval(P)


def check_runs_dir(P: Params) -> None:
    """``runs_dir`` must be a folder, or creatable: its nearest existing ancestor a writable folder."""
    path = Path(P.runs_dir) / P.run_name
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        why = "is not a folder" if not probe.is_dir() else "is not writable"
        raise InputError(f"runs_dir = {P.runs_dir!r}: cannot create {str(path)!r} ({str(probe)!r} {why})")


def check_model(name: str) -> None:
    """``model.name``: a known ``tiny:`` or ``toy:`` model, an existing local folder with a config.json,
    or a well-formed Hugging Face id whose revision resolves (in the local cache; online, its config
    is fetched first)."""
    if name.startswith("toy:"):
        from .toy_model import SHIPPED, parse

        try:
            seed = parse(name)
        except ValueError as e:
            raise InputError(f"model.name = {name!r}: {e}") from None
        if seed is None and not (SHIPPED / "config.json").is_file():
            raise InputError(f"model.name = {name!r}: the shipped checkpoint {SHIPPED} is missing")
        return
    if name.startswith("tiny:"):
        from .tiny import TINY_MODELS

        if name[5:] not in TINY_MODELS:
            raise InputError(f"model.name = {name!r}: unknown tiny model; tiny models: "
                             + ", ".join(f"tiny:{k}" for k in TINY_MODELS))
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"model.name = {name!r}: the folder has no config.json (not a saved model)")
        return
    looks_local = name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
    if looks_local or not _HF_ID.fullmatch(name):
        raise InputError(f"model.name = {name!r}: no such local folder, and not a Hugging Face id (org/name) "
                         "or a tiny:<family> model")
    from .identity import IdentityError, hf_revision

    try:  # keys hold the commit it resolves to (docs/run-directory.md)
        hf_revision(name)
    except IdentityError as e:
        raise InputError(str(e)) from None


def check_data(P: Params) -> None:
    """A VLGuard download: its folders and train.json, every record, every image inside its root,
    and sample sizes the splits can give."""
    d = P.data
    if d.vlguard_root is None:
        return  # the synthetic set is made by the data step
    if not Path(d.vlguard_root).is_dir():
        raise InputError(f"data.vlguard_root = {d.vlguard_root!r}: no such folder (download VLGuard from "
                         "huggingface.co/datasets/ys-zong/VLGuard, or set data.vlguard_root: null for synthetic data)")
    if d.image_root is not None and not Path(d.image_root).is_dir():
        raise InputError(f"data.image_root = {d.image_root!r}: no such folder")
    try:
        train_json, image_root = resolve_vlguard(d.vlguard_root, d.train_json, d.image_root)
    except DataError as e:
        raise InputError(f"data.train_json = {d.train_json!r}: {e}") from None
    try:
        splits = split_records(load_records(train_json), image_root, train_json, d.allow_outside_root)
    except DataError as e:
        raise InputError(str(e)) from None
    for key, split in (("n_ships", "safety"), ("n_scores", "safety"), ("n_scores", "utility")):
        try:
            sample_size(getattr(d, key), len(splits[split]), f"data.{key}", split)
        except DataError as e:
            raise InputError(str(e)) from None


def check_eval(P: Params) -> None:
    """Every benchmark's data file, and the LLM judge's folder when it is used."""
    from .evaluate.benchmarks import BenchmarkError, data_file

    E = P.eval
    for b in E.benchmarks:
        try:
            data_file(b, E.data_roots)
        except BenchmarkError as e:
            raise InputError(str(e)) from None
    if "llm" in E.judges and not (Path(E.llm_judge_path or "") / "config.json").is_file():
        raise InputError(f"eval.llm_judge_path = {E.llm_judge_path!r}: not a local model folder (no config.json)")


__all__ = ["InputError", "check", "steps_for"]
