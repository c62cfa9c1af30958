"""The benchmarks of notebook 06, each read from its real file format (docs/method.md).

``load_benchmark(name, data_roots)`` finds the data under ``eval.data_roots[name]`` (VLGuard's
subsets also look under ``data_roots["vlguard"]``) and returns :class:`~..items.EvalItem`s.
There is no silent fallback: a benchmark without a data root stops with a message that says
where to get it. ``params/tiny.yaml`` points every root at the small fixtures in
``tests/fixtures/eval/``, written in each benchmark's real format, so the tiny run is offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable, Mapping

from ...identity import images_fingerprint
from ...io import cached_file_hash, stable_hash
from ..items import BenchmarkError, EvalItem, Kind, first_n
from . import ch3ef, docvqa, mmbench, safebench, toy, vlguard


@dataclass(frozen=True)
class Benchmark:
    """A benchmark: its scoring kind, loader, data-file finder and where to get the data."""

    name: str
    kind: Kind
    load: Callable[[Path], list[EvalItem]]
    find_file: Callable[[Path], Path]
    how_to_get: str
    root_keys: tuple[str, ...]
    title: str


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("safebench", "refusal", safebench.load, safebench.find_file, safebench.HOW_TO_GET, ("safebench",),
              "SafeBench (FigStep)"),
    Benchmark("ch3ef", "mc_safety", ch3ef.load, ch3ef.find_file, ch3ef.HOW_TO_GET, ("ch3ef",), "Ch3Ef (harmless)"),
    Benchmark("mmbench", "mcq", mmbench.load, mmbench.find_file, mmbench.HOW_TO_GET, ("mmbench",), "MMBench"),
    Benchmark("docvqa", "vqa", docvqa.load, docvqa.find_file, docvqa.HOW_TO_GET, ("docvqa",), "DocVQA"),
    Benchmark("vlguard_unsafe", "refusal", partial(vlguard.load, name="vlguard_unsafe"), vlguard.find_file,
              vlguard.HOW_TO_GET, ("vlguard_unsafe", "vlguard"), "VLGuard unsafes"),
    Benchmark("vlguard_safe_unsafe", "refusal", partial(vlguard.load, name="vlguard_safe_unsafe"),
              vlguard.find_file, vlguard.HOW_TO_GET, ("vlguard_safe_unsafe", "vlguard"), "VLGuard safe-unsafes"),
    Benchmark("vlguard_safe_safe", "benign", partial(vlguard.load, name="vlguard_safe_safe"),
              vlguard.find_file, vlguard.HOW_TO_GET, ("vlguard_safe_safe", "vlguard"), "VLGuard safe-safes"),
    *(Benchmark(name, "names" if name == "toy_benign" else "refusal", partial(toy.load, name=name), toy.find_file,
                toy.HOW_TO_GET, (name,), title)
      for name, title in (("toy_harmful", "toy: harmful (seen templates)"), ("toy_harmful_novel",
                          "toy: harmful (novel phrasings)"), ("toy_unsafe_image", "toy: unsafe images"),
                          ("toy_benign", "toy: benign"))),
)}
SAFETY_KINDS = ("refusal", "mc_safety")


def get(name: str) -> Benchmark:
    """The benchmark called ``name``, or an error listing the known ones."""
    if name not in BENCHMARKS:
        raise BenchmarkError(f"unknown benchmark {name!r}; benchmarks: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def data_root(name: str, data_roots: Mapping[str, str]) -> Path:
    """The folder (or file) holding ``name``'s data, from ``eval.data_roots``."""
    b = get(name)
    key = next((k for k in b.root_keys if data_roots.get(k)), None)
    if key is None:
        raise BenchmarkError(f"{b.title}: eval.data_roots.{b.root_keys[-1]} is not set; {b.how_to_get}")
    root = Path(data_roots[key]).expanduser()
    if not root.exists():
        raise BenchmarkError(f"{b.title}: eval.data_roots.{key} = {str(root)!r} does not exist; {b.how_to_get}")
    return root


def data_file(name: str, data_roots: Mapping[str, str]) -> Path:
    """The benchmark's main data file (CSV, JSON or TSV)."""
    return get(name).find_file(data_root(name, data_roots))


def data_fingerprint(name: str, data_roots: Mapping[str, str]) -> str:
    """Hash of the benchmark by content: its main data file and every image file its items show,
    in order (what step caching compares). File hashes are cached per machine
    (:func:`hsr_lib.identity.file_hash`); a file its loader refuses counts by its bytes alone (the
    evaluation names the fault when it loads it)."""
    path = data_file(name, data_roots)
    digest = cached_file_hash(path)
    try:
        items = _items(name, str(data_root(name, data_roots)), str(path), digest)
    except (ValueError, OSError):  # BenchmarkError, DataError
        return digest
    return stable_hash({"file": digest, "images": images_fingerprint(
        p for it in items if it.image_kind == "path" for p in it.image)})


@lru_cache(maxsize=32)
def _items(name: str, root: str, path: str, digest: str) -> list[EvalItem]:
    """Every item of a benchmark file version (parsed once per process; images anywhere)."""
    return get(name).load(Path(root), allow_outside=True)


def refuse_duplicates(b: Benchmark, items: list[EvalItem]) -> None:
    """Item ids key the answers and the scores: a second item with an id is refused, naming both."""
    first: dict[str, EvalItem] = {}
    for it in items:
        if it.id in first:
            raise BenchmarkError(f"{b.title}: item id {it.id!r} appears twice: {first[it.id].source} and {it.source}; "
                                 "ids must be unique")
        first[it.id] = it


def load_benchmark(name: str, data_roots: Mapping[str, str], n_items: int | None = None,
                   circular: bool = False, allow_outside: bool = False) -> list[EvalItem]:
    """The benchmark's items: the first ``n_items`` questions (MMBench: rotations per ``circular``);
    image paths must resolve inside the benchmark's folder unless ``allow_outside``."""
    b = get(name)
    items = b.load(data_root(name, data_roots), allow_outside=allow_outside)
    refuse_duplicates(b, items)
    if name == "mmbench":
        items = mmbench.select(items, circular)
    return first_n(items, n_items)


__all__ = ["BENCHMARKS", "Benchmark", "BenchmarkError", "SAFETY_KINDS", "data_file", "data_fingerprint", "data_root",
           "get", "load_benchmark"]
