"""The data step (notebook 01): VLGuard (or the synthetic stand-in) → the three sets and the
seeded samples that Ships and the importance scores use, saved as JSONL in ``<run>/data``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .data import (SPLITS, Sample, check_images, load_records, load_samples, resolve_vlguard, sample,
                   save_samples, split_records)
from .io import atomic_write_json, file_hash, read_json
from .runs import Run
from .synthetic import make_synthetic_vlguard

# sample file -> (split it is drawn from, params key of n, params key of the seed)
SAMPLES: dict[str, tuple[str, str, str]] = {
    "ships_safety": ("safety", "n_ships", "seed_ships"),
    "scores_safety": ("safety", "n_scores", "seed_scores"),
    "scores_utility": ("utility", "n_scores", "seed_scores"),
}


@dataclass
class DataSets:
    """The saved sets of a run: full splits and the seeded samples, plus a summary."""

    dir: Path
    summary: dict

    def load(self, name: str) -> list[Sample]:
        """A split ('safety', 'utility', 'safe_unsafe') or a sample ('ships_safety', ...)."""
        if name not in (*SPLITS, *SAMPLES):
            raise KeyError(f"unknown set {name!r}; sets: {', '.join((*SPLITS, *SAMPLES))}")
        return load_samples(self.dir / f"{name}.jsonl")


def _source(run: Run) -> tuple[Path, Path, dict]:
    """train.json and image root of the run, and the inputs that fingerprint them."""
    d = run.params.data
    if d.vlguard_root is None:
        root = run.step_dir("data") / "synthetic_vlguard"
        return root / "train.json", root, {"synthetic": True}
    train_json, image_root = resolve_vlguard(d.vlguard_root, d.train_json, d.image_root)
    return train_json, image_root, {"train_json": file_hash(train_json), "image_root": str(image_root)}


def prepare_data(run: Run) -> DataSets:
    """Build (or reuse) the data step's artifacts for ``run``."""
    d = run.params.data
    train_json, image_root, inputs = _source(run)
    out = run.step_dir("data")
    if run.is_done("data", inputs):
        return DataSets(out, read_json(out / "summary.json"))
    with run.step("data", inputs) as out:
        if d.vlguard_root is None:
            make_synthetic_vlguard(image_root, n_records=d.n_synthetic, seed=0)
        splits = split_records(load_records(train_json), image_root, source=train_json)
        for name, items in splits.items():
            save_samples(out / f"{name}.jsonl", items)
        drawn = {}
        for name, (split, n_key, seed_key) in SAMPLES.items():
            items = sample(splits[split], getattr(d, n_key), getattr(d, seed_key))
            check_images(items)
            save_samples(out / f"{name}.jsonl", items)
            drawn[name] = {"from": split, "n": len(items), "seed": getattr(d, seed_key),
                           "ids": [s.id for s in items]}
        summary = {
            "source": "synthetic" if d.vlguard_root is None else str(train_json),
            "train_json": str(train_json),
            "image_root": str(image_root),
            "n_records": sum(len(v) for k, v in splits.items() if k != "safe_unsafe"),
            "splits": {k: len(v) for k, v in splits.items()},
            "samples": drawn,
        }
        atomic_write_json(out / "summary.json", summary)
    return DataSets(out, summary)
