"""The data step (notebook 01): VLGuard (or the synthetic stand-in) → the three sets and the
seeded samples that Ships and the importance scores use, saved as JSONL in
``data/<synthetic|vlguard>-<hash>/`` (docs/method.md).

Downstream steps do not take this step's whole fingerprint: each takes the fingerprint of the
one sample it reads (:func:`sample_fingerprint`), so changing ``data.n_scores`` leaves Ships alone.
"""

from __future__ import annotations

import functools
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import (SPLITS, DataError, Sample, check_images, load_records, load_samples, resolve_vlguard, sample, sample_size,
                    save_samples, split_records)
from ..identity import images_fingerprint
from ..io import atomic_write_json, cached_file_hash, stable_hash
from ..params import Params
from ..runs import Run, Spec
from ..synthetic import make_synthetic_vlguard
from ..toy_world import train_set, write_vlguard
from .base import Result, finished

NAME = "data"
# sample file -> (split it is drawn from, params key of n, params key of the seed)
SAMPLES: dict[str, tuple[str, str, str]] = {
    "ships_safety": ("safety", "n_ships", "seed_ships"),
    "scores_safety": ("safety", "n_scores", "seed_scores"),
    "scores_utility": ("utility", "n_scores", "seed_scores"),
}
SYNTHETIC_SEED = 0
TOY_WORLD_VERSION = 2  # bump when hsr_lib.toy_world changes what it generates


@dataclass
class DataSets(Result):
    """The saved sets of a run: full splits and the seeded samples. Image paths are stored
    relative to the image root and resolved against ``root`` (so a moved run still finds them)."""

    root: Path | None = None

    def load(self, name: str) -> list[Sample]:
        """A split ('safety', 'utility', 'safe_unsafe') or a sample ('ships_safety', ...)."""
        if name not in (*SPLITS, *SAMPLES):
            raise KeyError(f"unknown set {name!r}; sets: {', '.join((*SPLITS, *SAMPLES))}")
        return load_samples(self.dir / f"{name}.jsonl", self.root)


def source(P: Params, run_dir: Path | None = None) -> tuple[Path | None, Path | None, dict[str, Any]]:
    """``(train.json, image root, what fingerprints them)``; for synthetic data the paths are
    those inside ``run_dir`` (None without one)."""
    d = P.data
    if d.vlguard_root is None:
        root = None if run_dir is None else synthetic_dir(run_dir, P)
        inputs = {"synthetic": d.n_synthetic, "seed": SYNTHETIC_SEED} if d.synthetic == "generic" else \
            {"toy_world": TOY_WORLD_VERSION, "seed": SYNTHETIC_SEED}
        return (None if root is None else root / "train.json"), root, inputs
    train_json, image_root = resolve_vlguard(d.vlguard_root, d.train_json, d.image_root)
    # content, not location: a moved download keeps its keys
    return train_json, image_root, {"train_json": cached_file_hash(train_json)}


def synthetic_sizes(P: Params) -> dict[str, int]:
    """The sizes of the synthetic set's splits, known before the data step makes it."""
    if P.data.synthetic == "toy":
        import inspect

        n = {k: v.default for k, v in inspect.signature(train_set).parameters.items()}
        return {"safety": n["n_harmful"] + n["n_unsafe"], "utility": n["n_benign"], "safe_unsafe": n["n_benign"]}
    unsafe = (P.data.n_synthetic + 1) // 2  # make_synthetic_vlguard: half unsafe, rounded up
    return {"safety": unsafe, "utility": P.data.n_synthetic - unsafe, "safe_unsafe": P.data.n_synthetic - unsafe}


def synthetic_dir(run_dir: Path, P: Params) -> Path:
    """Where a run keeps its generated VLGuard-shaped set (generic, or the toy's training world)."""
    if P.data.synthetic == "toy":
        return Path(run_dir) / NAME / f"toy-world-v{TOY_WORLD_VERSION}"
    return Path(run_dir) / NAME / f"synthetic-vlguard-n{P.data.n_synthetic}"


@functools.lru_cache(maxsize=8)
def _records(train_json: str, digest: str) -> list[dict]:
    return load_records(train_json)


@functools.lru_cache(maxsize=8)
def _splits(train_json: str, digest: str, image_root: str, allow_outside: bool) -> dict[str, list[Sample]]:
    return split_records(_records(train_json, digest), image_root, source=train_json, allow_outside=allow_outside)


def images(P: Params, name: str | None = None) -> str | None:
    """The content of the VLGuard images a step reads: every record's (the data step), or those of one
    sample (``name``), in order; None for the synthetic sets (made by the data step from its key).
    Data the data step will refuse falls back to every record's images that exist."""
    d = P.data
    if d.vlguard_root is None:
        return None
    train_json, image_root, inputs = source(P)
    if name is not None:
        split, n_key, seed_key = SAMPLES[name]
        try:
            items = _splits(str(train_json), inputs["train_json"], str(image_root), d.allow_outside_root)[split]
            n = sample_size(getattr(d, n_key), len(items), f"data.{n_key}", split)
            return images_fingerprint([x.image for x in sample(items, n, getattr(d, seed_key))])
        except DataError:
            pass
    try:
        records = _records(str(train_json), inputs["train_json"])
    except DataError:
        return None
    return images_fingerprint([os.path.join(image_root, r["image"]) for r in records])


def sample_fingerprint(P: Params, name: str) -> str:
    """The fingerprint of one sample's content: its source, size, seed and images."""
    split, n_key, seed_key = SAMPLES[name]
    return stable_hash({"source": source(P)[2], "split": split, "n": getattr(P.data, n_key),
                        "seed": getattr(P.data, seed_key), "images": images(P, name)})


def spec(P: Params) -> Spec:
    """The data step's key: the source (train.json and every image it names) and every sample's size and seed."""
    d = P.data
    reads = {"source": source(P)[2], "images": images(P),
             **{k: getattr(d, k) for k in ("n_ships", "seed_ships", "n_scores", "seed_scores")}}
    label = "vlguard" if d.vlguard_root is not None else "toy" if d.synthetic == "toy" else "synthetic"
    return Spec(NAME, label, reads, params=P, runner=run)


def load(run: Run) -> DataSets:
    """The finished data step of ``run``'s params."""
    s = spec(run.params)
    d, summary = finished(run, s, "data")
    return DataSets(d, s.key, summary, source(run.params, run.dir)[1])


def _make_synthetic(root: Path, P: Params) -> None:
    """Generate the synthetic set into ``root`` once (into a hidden sibling, then renamed)."""
    if (root / "train.json").is_file():
        return
    tmp = root.with_name(f".{root.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if P.data.synthetic == "toy":
        write_vlguard(train_set(SYNTHETIC_SEED), tmp)
    else:
        make_synthetic_vlguard(tmp, n_records=P.data.n_synthetic, seed=SYNTHETIC_SEED)
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)


def run(run: Run, *, upstream: str = "compute", progress: bool = True) -> DataSets:
    """Build (or reuse) the data step's artifacts for ``run``."""
    s = spec(run.params)
    if run.is_done(s):
        return load(run)
    d = run.params.data
    train_json, image_root, _ = source(run.params, run.dir)
    with run.step(s) as out:
        if d.vlguard_root is None:
            _make_synthetic(image_root, run.params)
        splits = split_records(load_records(train_json), image_root, source=train_json,
                               allow_outside=d.allow_outside_root)
        for items in splits.values():  # every image decodes before any set is written
            check_images(items)
        for name, items in splits.items():
            save_samples(out / f"{name}.jsonl", items, image_root)
        drawn = {}
        for name, (split, n_key, seed_key) in SAMPLES.items():
            n = sample_size(getattr(d, n_key), len(splits[split]), f"data.{n_key}", split)
            items = sample(splits[split], n, getattr(d, seed_key))
            save_samples(out / f"{name}.jsonl", items, image_root)
            drawn[name] = {"from": split, "n": len(items), "seed": getattr(d, seed_key),
                           "ids": [x.id for x in items]}
        synthetic = d.vlguard_root is None
        summary = {
            "source": ("synthetic" if d.synthetic == "generic" else "toy") if synthetic else str(train_json),
            "train_json": str(train_json.relative_to(run.dir)) if synthetic else str(train_json),
            "image_root": str(image_root.relative_to(run.dir)) if synthetic else str(image_root),
            "n_records": sum(len(v) for k, v in splits.items() if k != "safe_unsafe"),
            "splits": {k: len(v) for k, v in splits.items()},
            "samples": drawn,
        }
        atomic_write_json(out / "summary.json", summary)
    return load(run)
