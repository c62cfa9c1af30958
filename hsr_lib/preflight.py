"""Every bad input named before any notebook starts (docs/run-directory.md): cheap checks of what the
steps a command will run are going to read — params against the model's geometry (its config only,
no weights), a downloaded VLGuard's records and the images of the sampled ones, the benchmarks'
rows and the images of the items evaluated. Each problem is one line that names the key, file,
record or path (:class:`InputError`; ``hsr`` exits with 2)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable

from PIL import Image

from .data import DataError, load_records, resolve_vlguard, sample, sample_size, split_records
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
    if steps & {"prune", "realign"}:
        check_geometry(P, steps)
    if "evaluate" in steps:
        check_eval(P)


def decodable(path: str | os.PathLike, who: str) -> None:
    """The image at ``path`` decodes (a PNG's chunks and checksums verified, other formats loaded):
    a :class:`InputError` naming ``who`` and the file otherwise (a truncated or damaged download)."""
    try:
        with Image.open(path) as im:
            if im.format == "PNG":
                im.verify()
            else:
                im.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InputError(f"{who}: cannot read image {str(path)!r}: {e}") from None


def _model_config(P: Params):
    """The model's config without its weights (a toy not trained yet: the shipped toy's, whose
    widths and heads every toy recipe shares)."""
    from .models import ModelError, model_config

    name = P.model.name
    if name.startswith("toy:"):
        from .toy_model import SHIPPED, checkpoint

        try:
            name = str(checkpoint(name, train_missing=False))
        except FileNotFoundError:
            name = str(SHIPPED)
    try:
        return model_config(name, P.seed)
    except ModelError as e:
        raise InputError(str(e)) from None


def check_geometry(P: Params, steps: set[str]) -> None:
    """Bounds that depend on the model's shape: ``realign.top_h`` against its number of attention
    heads, an N:M ``pruning.pattern`` against the input width of every pruned linear."""
    from .adapters import adapter_for
    from .sparsity import parse_pattern

    config = _model_config(P)
    try:
        adapter = adapter_for(config, P.model.family)
        geo = adapter.geometry(config)
    except ValueError as e:
        raise InputError(f"model.name = {P.model.name!r}: {e}") from None
    name = P.model.name
    if "realign" in steps and P.realign.top_h > geo.n_heads_total:
        raise InputError(f"realign.top_h = {P.realign.top_h} but {name} has only {geo.n_heads_total} attention heads "
                         f"({geo.n_layers} layers x {geo.n_heads})")
    nm = parse_pattern(P.pruning.pattern) if "prune" in steps else None
    if nm:
        tc = adapter.text_config(config)
        widths = {"hidden_size (the input of q/k/v/gate/up_proj)": geo.hidden_size,
                  "heads x head_dim (the input of o_proj)": geo.n_heads * geo.head_dim,
                  "intermediate_size (the input of down_proj)": getattr(tc, "intermediate_size", geo.hidden_size)}
        for what, width in widths.items():
            if width % nm[1]:
                raise InputError(f"pruning.pattern = {P.pruning.pattern!r} needs every pruned layer's input width "
                                 f"divisible by {nm[1]}, but {name}'s {what} is {width}")


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
    """A VLGuard download: its folders and train.json, every record (ids unique), every image inside
    its root, sample sizes the splits can give, and the images of the sampled records decodable. The
    synthetic sets (made by the data step): sample sizes against the sizes they will have."""
    from .steps.data import SAMPLES, synthetic_sizes

    d = P.data
    if d.vlguard_root is None:
        sizes = synthetic_sizes(P)
        for name, (split, key, _) in SAMPLES.items():
            try:
                sample_size(getattr(d, key), sizes[split], f"data.{key}", f"{split} (synthetic, {d.synthetic})")
            except DataError as e:
                raise InputError(str(e)) from None
        return
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
    sampled: dict[str, str] = {}
    for split, key, seed in SAMPLES.values():
        try:
            n = sample_size(getattr(d, key), len(splits[split]), f"data.{key}", split)
        except DataError as e:
            raise InputError(str(e)) from None
        sampled.update({s.image: s.id for s in sample(splits[split], n, getattr(d, seed))})
    for image, rid in sampled.items():
        decodable(image, f"record id {rid!r} in {str(train_json)!r}")


def check_eval(P: Params) -> None:
    """Every benchmark's rows (read, ids unique, images inside their root), the images of the items
    that will be evaluated (downloaded benchmarks; the toy's test set ships with the package), and
    the LLM judge's folder when it is used."""
    from .evaluate.benchmarks import BenchmarkError, load_benchmark

    E = P.eval
    for b in E.benchmarks:
        try:
            items = load_benchmark(b, E.data_roots, E.n_items, E.mmbench_circular, P.data.allow_outside_root)
            if b.startswith("toy_"):
                continue
            seen: set[str] = set()
            for it in items:
                if it.image_kind == "figstep" or it.image[0] in seen:
                    continue  # FigStep images are rendered; rotations share their image
                seen.update(it.image)
                if it.image_kind == "base64":
                    it.load_image()
                for path in it.image if it.image_kind == "path" else ():
                    decodable(path, f"{it.source}")
        except BenchmarkError as e:
            raise InputError(str(e)) from None
    if "llm" in E.judges and not (Path(E.llm_judge_path or "") / "config.json").is_file():
        raise InputError(f"eval.llm_judge_path = {E.llm_judge_path!r}: not a local model folder (no config.json)")


__all__ = ["InputError", "check", "steps_for"]
