"""``hsr export``: one variant of a finished run as an ordinary Hugging Face model folder
(docs/using-the-model.md).

The variant (``pruned``, ``hsr``, ``hsr_a``, ``random_heads@<seed>``) is resolved from the run's
``params.yaml`` plus overrides to its keyed artifacts, through the steps API; nothing is
recomputed: the model is rebuilt from the dense checkpoint and those artifacts (as the run itself
does), saved with ``save_pretrained``, and the base model's tokenizer, processor, chat-template and
generation-config files are copied byte for byte. Beside the weights: ``README.md`` (the model
card, :mod:`hsr_lib.model_card`) and ``hsr_export.json`` (params, artifact keys and content
hashes, the structure of the sparsity, the run's evaluation, package versions). The folder is
written in a hidden sibling and renamed into place only when complete.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .io import atomic_write_json, atomic_write_text, file_hash, honour_umask, read_json
from .params import Params, load_params, parse_variant
from .runs import MARKER, Run, Spec, environment

FORMATS = ("safetensors", "compressed-tensors")
EXPORT_VARIANTS = "pruned, hsr, hsr_a, random_heads or random_heads@<seed>"
# the base model's files that travel unchanged (tokenizer, processor, chat template, generation config)
BASE_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
              "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "spiece.model",
              "processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
              "chat_template.json", "chat_template.jinja", "generation_config.json")
BASE_DIRS = ("additional_chat_templates",)
VIDEO_CONFIG = "video_preprocessor_config.json"
QWEN_VL_TYPES = ("qwen2_vl", "qwen2_5_vl")
# what a Qwen2-VL video processor shares with its image processor (the rest keeps its defaults)
_VIDEO_KEYS = ("do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "image_mean", "image_std", "merge_size",
               "patch_size", "resample", "rescale_factor", "size", "temporal_patch_size", "min_pixels", "max_pixels")


class ExportError(ValueError):
    """An export that cannot be made from this run as asked; the message names why."""


@dataclass
class Source:
    """A variant resolved to its finished artifacts: the run (seen with the variant's params), its
    keyed spec and its loaded step result (prune or realign)."""

    run: Run
    variant: str
    spec: Spec
    result: Any
    overrides: tuple[str, ...] = ()

    @property
    def params(self) -> Params:
        return self.run.params

    @property
    def realigned(self) -> bool:
        return self.spec.step == "realign"


def open_run(run_dir: str | os.PathLike, overrides: Sequence[str] = ()) -> Run:
    """The run directory ``run_dir`` seen with its ``params.yaml`` plus ``overrides`` (nothing is written)."""
    d = Path(run_dir)
    if not d.is_dir():
        raise ExportError(f"{d}: no such run directory")
    if not (d / "params.yaml").is_file():
        raise ExportError(f"{d}: not a run directory (no params.yaml; a run writes it when its first step finishes)")
    return Run(load_params(d / "params.yaml", list(overrides)), d.resolve(), verify=False, force=())


def _check_done(run: Run, spec: Spec) -> None:
    """Raise :class:`ExportError` naming the missing artifact, or listing the finished keys there are."""
    why = run.problem(spec)
    if why is None:
        return
    if why in ("not computed", "made with other inputs"):
        keys = run.keys(spec.step)
        there = ", ".join(keys) if keys else "none"
        raise ExportError(f"{run.dir}: no finished {spec.step} step matches these params (they would make "
                          f"{spec.where}); finished {spec.step} keys there: {there}")
    raise ExportError(f"{spec.where}: {why}; rerun the step (hsr run) before exporting")


def resolve(run_dir: str | os.PathLike, variant: str, overrides: Sequence[str] = ()) -> Source:
    """Resolve ``variant`` of the run at ``run_dir`` (its params plus ``overrides``) to its finished
    artifacts; :class:`ExportError` naming what is missing otherwise."""
    from .steps import prune, realign
    from .steps import variants as V

    from .identity import IdentityError

    run = open_run(run_dir, overrides)
    try:
        kind, _ = parse_variant(variant)
    except ValueError:
        raise ExportError(f"--variant {variant!r}: use {EXPORT_VARIANTS}") from None
    if kind == "dense":
        raise ExportError(f"--variant dense is the base checkpoint ({run.params.model.name}) itself; "
                          f"export {EXPORT_VARIANTS}")
    vrun = run.using(V.variant_params(run.params, variant))
    spec = V.variant_spec(run.params, variant)
    try:
        _check_done(vrun, prune.spec(vrun.params))  # its key holds the base model's identity (content)
    except IdentityError as err:
        raise ExportError(str(err)) from None
    if kind == "pruned":
        return Source(vrun, variant, spec, prune.load(vrun), tuple(overrides))
    _check_done(vrun, spec)
    return Source(vrun, variant, spec, realign.load(vrun), tuple(overrides))


def default_out(src: Source) -> Path:
    """``RUN_DIR/export/<variant>-<key>/``."""
    from .steps.variants import label

    return src.run.dir / "export" / f"{label(src.variant)}-{src.spec.key}"


# ----- the base model -------------------------------------------------------------------------------

def base_kind(name: str) -> str:
    """'tiny', 'toy', 'local' (a folder) or 'hf' (a Hub id)."""
    if name.startswith("tiny:"):
        return "tiny"
    if name.startswith("toy:"):
        return "toy"
    return "local" if Path(name).is_dir() else "hf"


def base_folder(name: str) -> Path | None:
    """The folder the base model's files are read from (None for ``tiny:``, built in code); an HF
    id must be in the local cache. Nothing is trained or downloaded."""
    kind = base_kind(name)
    if kind == "tiny":
        return None
    if kind == "toy":
        from .toy_model import checkpoint

        try:
            return checkpoint(name, train_missing=False)
        except (ValueError, FileNotFoundError) as err:
            raise ExportError(f"model.name = {name!r}: {err}") from None
    if kind == "local":
        return Path(name)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception as err:  # noqa: BLE001 (the hub raises several kinds; all mean "not here")
        raise ExportError(f"model.name = {name!r}: its files are not in the local Hugging Face cache ({err})") \
            from None


def base_identity(name: str, folder: Path | None, seed: int) -> dict[str, Any]:
    """What identifies the base model: its name, kind, the fingerprint the run's keys hold
    (:func:`hsr_lib.identity.model_fingerprint`) and the content hash of each of its model files."""
    from .identity import file_hash as cached_hash
    from .identity import model_fingerprint, model_files

    kind = base_kind(name)
    ident: dict[str, Any] = {"name": name, "kind": kind, "hf_id": name if kind == "hf" else None,
                             "fingerprint": model_fingerprint(name, seed)}
    if folder is None:  # tiny: built in code from its name, build version and seed
        ident["seed"] = seed
    else:
        ident["files"] = {str(p.relative_to(folder)): cached_hash(p) for p in model_files(folder)}
    return ident


def base_license(folder: Path | None, kind: str) -> str | None:
    """The base model's license when known: the ``license:`` of its model card's front matter; for the
    teaching toy (package data), the package's own license."""
    if kind == "toy":
        import importlib.metadata as md

        try:
            text = md.metadata("hsr").get("License")
        except md.PackageNotFoundError:
            return None
        return text.strip().lower() if text else None
    card = folder / "README.md" if folder is not None else None
    if card is None or not card.is_file():
        return None
    front = _front_matter(card.read_text(encoding="utf-8", errors="replace"))
    lic = front.get("license") if isinstance(front, dict) else None
    return str(lic) if lic else None


def _front_matter(text: str) -> dict:
    import yaml

    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    try:
        return yaml.safe_load(text[3:end]) or {} if end > 0 else {}
    except yaml.YAMLError:
        return {}


def copy_base_files(folder: Path, out: Path) -> dict[str, str]:
    """Copy the tokenizer, processor, chat-template and generation-config files of ``folder`` into
    ``out`` byte for byte; ``{relative name: content hash}`` of what was copied (checked after copying)."""
    copied = {}
    for name in BASE_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, out / name)
            copied[name] = file_hash(folder / name)
    for d in BASE_DIRS:
        if (folder / d).is_dir():
            for p in sorted((folder / d).rglob("*")):
                if p.is_file():
                    rel = p.relative_to(folder)
                    (out / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(p, out / rel)
                    copied[str(rel)] = file_hash(p)
    bad = [n for n, h in copied.items() if file_hash(out / n) != h]
    if bad:
        raise OSError(f"{out}: copies of {', '.join(bad)} differ from the base model's files")
    return copied


def video_config(out: Path, model_type: str) -> dict[str, Any] | None:
    """For a Qwen2-VL-type folder whose processor has no video part (the teaching toy): the
    ``video_preprocessor_config.json`` that ``AutoProcessor`` needs where torchvision is installed,
    derived from the image processor's settings. None when the folder needs none."""
    if model_type not in QWEN_VL_TYPES or (out / VIDEO_CONFIG).is_file() or (out / "preprocessor_config.json").is_file():
        return None
    proc = read_json(out / "processor_config.json") if (out / "processor_config.json").is_file() else {}
    if "video_processor" in proc or "image_processor" not in proc:
        return None
    image = proc["image_processor"]
    return {"video_processor_type": "Qwen2VLVideoProcessor", **{k: image[k] for k in _VIDEO_KEYS if k in image},
            "processor_class": proc.get("processor_class", "Qwen2VLProcessor")}


# ----- facts read from the run ----------------------------------------------------------------------

def artifact_files(run: Run, spec: Spec) -> dict[str, str]:
    """``{file: content hash}`` of a finished keyed folder, as its marker recorded them while writing."""
    return {name: rec[2] for name, rec in run.recorded(spec).get("files", {}).items()}


def zero_pattern(lm, mask_path: Path) -> dict[str, int]:
    """How the built model's zeros match the mask: pruned entries, zeros, pruned entries that are not
    zero (must be 0), and zeros the mask does not hold (dense weights that are exactly zero)."""
    from .masks import load_masks, mask_shapes

    lins = lm.prunable_linears()
    out = {"modules": 0, "pruned": 0, "zeros": 0, "pruned_not_zero": 0, "zeros_not_pruned": 0}
    for name in mask_shapes(mask_path):
        mask = load_masks(mask_path, [name])[name]
        zero = (lins[name].weight.detach() == 0).cpu()
        out["modules"] += 1
        out["pruned"] += int(mask.sum())
        out["zeros"] += int(zero.sum())
        out["pruned_not_zero"] += int((mask & ~zero).sum())
        out["zeros_not_pruned"] += int((zero & ~mask).sum())
    return out


def _records(df) -> list[dict[str, Any]]:
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
            for r in df.to_dict(orient="records")]


def structure(src: Source) -> dict[str, Any]:
    """Sparsity per module type in the pruned model and in this one, and (N:M) the blocks that
    restoring filled above the pattern."""
    from .structure import mask_file_report

    pattern = src.params.pruning.pattern
    pruned = mask_file_report(src.result.pruned.mask_path if src.realigned else src.result.mask_path, pattern)
    this = mask_file_report(src.result.dir / "mask.safetensors", pattern) if src.realigned else pruned
    return {"pattern": pattern, "pruned": _records(pruned), "exported": _records(this)}


def _cell(row) -> dict[str, Any]:
    """One metric value (in %) with its n and, when the run has them, its interval."""
    def num(k):
        v = row.get(k) if hasattr(row, "get") else None
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    return {"value": num("value"), "n": None if num("n") is None else int(num("n")),
            "ci_low": num("ci_low"), "ci_high": num("ci_high")}


def _pooled(cells: list[dict[str, Any]], with_interval: bool) -> dict[str, Any] | None:
    """The n-weighted combination of several rates in % (and its Wilson interval when the run
    reports intervals and :mod:`hsr_lib.evaluate.stats` is there)."""
    cells = [c for c in cells if c["value"] is not None and c["n"]]
    if not cells:
        return None
    n = sum(c["n"] for c in cells)
    k = sum(c["value"] / 100 * c["n"] for c in cells)
    out = {"value": 100 * k / n, "n": n, "ci_low": None, "ci_high": None}
    if with_interval:
        try:
            from .evaluate.stats import wilson  # type: ignore[import-not-found]
        except ImportError:
            return out
        lo, hi = wilson(round(k), n)
        out.update(ci_low=100 * lo, ci_high=100 * hi)
    return out


SAFETY_KINDS = ("refusal", "mc_safety")
UTILITY_METRICS = ("accuracy", "circular_accuracy", "anls")
COMBINED = "combined"  # the benchmark name of metrics.csv's rows that combine a run's sets


def _safety_sets(benchmarks: list[str]) -> tuple[list[str], str]:
    """The sets the run's combined ASR is taken over and how ('mean' or 'pooled'), as its evaluation
    does (:func:`hsr_lib.evaluate.comparisons.safety_sets`); every safety set pooled where that is absent."""
    try:
        from .evaluate.comparisons import safety_sets
    except ImportError:
        return benchmarks, "pooled"
    return safety_sets(benchmarks)


def evaluation(src: Source) -> dict[str, Any] | None:
    """The run's evaluation of this variant beside the dense and pruned models, read from the
    evaluation folder that holds it (the params' own first): ASR per safety benchmark and combined,
    utility, over-refusal and intervals where the run has them, RSR. None when no evaluation of
    this run holds the variant."""
    import pandas as pd

    from .evaluate.metrics import rsr
    from .steps import evaluate, prune

    run = src.run
    prune_where = prune.spec(src.params).where
    try:
        own = evaluate.spec(src.params).key
    except Exception:  # noqa: BLE001 (a benchmark file moved away: look at the finished folders only)
        own = None
    keys = run.keys("evaluate")
    keys = ([own] if own in keys else []) + [k for k in keys if k != own]
    for key in keys:
        d = run.dir / "evaluate" / key
        summary = read_json(d / "summary.json")
        names = {}
        for st in summary.get("variants", []):
            where = st.get("from")
            role = ("dense" if where == "the params' model" else "pruned" if where == prune_where
                    else "this model" if where == src.spec.where else None)
            if role and role not in names:
                names[role] = st["variant"]
        if "this model" not in names and not (src.spec.step == "prune" and "pruned" in names):
            continue
        if src.spec.step == "prune":
            names["this model"] = names["pruned"]
        metrics = pd.read_csv(d / "metrics.csv", keep_default_na=False,
                              na_values={c: [""] for c in ("value", "ci_low", "ci_high", "n", "undecided")})
        has_ci = {"ci_low", "ci_high"} <= set(metrics.columns) and bool(metrics["ci_low"].notna().any())
        judge = summary.get("primary_judge", "")
        benches = summary.get("benchmarks", {})
        rows = []
        for role in ("dense", "pruned", "this model"):
            if role not in names or (role == "pruned" and src.spec.step == "prune"):
                continue
            m = metrics[metrics.variant == names[role]]
            row: dict[str, Any] = {"role": role, "variant": names[role], "asr": {}, "utility": {},
                                   "over_refusal": {}}
            for b, info in benches.items():
                mb = m[m.benchmark == b]
                if info.get("kind") in SAFETY_KINDS:
                    sel = mb[(mb.metric == "asr") & ((mb.judge == judge) if info["kind"] == "refusal" else True)]
                    if len(sel):
                        row["asr"][b] = _cell(sel.iloc[0])
                else:
                    for metric in UTILITY_METRICS:
                        sel = mb[mb.metric == metric]
                        if len(sel):
                            row["utility"][f"{b} {metric}"] = _cell(sel.iloc[0])
            for b in [*benches, COMBINED]:
                over = m[(m.benchmark == b) & (m.metric == "over_refusal")]
                if len(over):
                    primary = over[over.judge == judge]
                    row["over_refusal"][b] = _cell((primary if len(primary) else over).iloc[0])
            comb = m[(m.benchmark == COMBINED) & (m.metric == "asr")]
            row["asr_combined"] = _cell(comb.iloc[0]) if len(comb) else _pooled(list(row["asr"].values()), has_ci)
            rsr_row = m[(m.benchmark == COMBINED) & (m.metric == "rsr")]
            row["rsr"] = _cell(rsr_row.iloc[0]) if len(rsr_row) else None
            rows.append(row)
        by = {r["role"]: r for r in rows}
        safety, how = _safety_sets(list(benches))
        out = {"key": key, "primary_judge": judge, "intervals": has_ci, "combined_over": safety, "combined_how": how,
               "benchmarks": {b: {"title": i.get("title", b), "kind": i.get("kind"), "n_items": i.get("n_items")}
                              for b, i in benches.items()}, "rows": rows, "rsr": None}
        if src.realigned and "this model" in by:
            if by["this model"]["rsr"] is not None:  # the run's own RSR, with its paired-bootstrap interval
                out["rsr"] = by["this model"]["rsr"]
            elif {"dense", "pruned"} <= set(by):
                combined = [by[r]["asr_combined"]["value"] if by[r]["asr_combined"] else None
                            for r in ("pruned", "this model", "dense")]
                value = rsr(*combined)
                out["rsr"] = None if value is None else {"value": value, "n": None, "ci_low": None, "ci_high": None}
        return out
    return None


# ----- the export -----------------------------------------------------------------------------------

def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _base_dtype(folder: Path | None):
    """The torch dtype the base checkpoint is stored in (its config.json), so the export is no larger."""
    import torch

    if folder is None or not (folder / "config.json").is_file():
        return None
    cfg = read_json(folder / "config.json")
    name = cfg.get("dtype") or cfg.get("torch_dtype") or (cfg.get("text_config") or {}).get("dtype")
    return getattr(torch, name, None) if isinstance(name, str) else None


def export(run_dir: str | os.PathLike, variant: str, overrides: Sequence[str] = (), out: str | os.PathLike | None = None,
           fmt: str = "safetensors") -> Path:
    """Write ``variant`` of the run at ``run_dir`` as an HF model folder (default
    ``RUN_DIR/export/<variant>-<key>/``), atomically; returns the folder."""
    from . import model_card

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: use {' or '.join(FORMATS)}")
    if fmt == "compressed-tensors":
        from .compressed import missing

        if why := missing():
            raise ExportError(why)
    src = resolve(run_dir, variant, overrides)
    P = src.params
    folder = base_folder(P.model.name)
    out = Path(out) if out else default_out(src)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        lm = src.result.build()
        dtype = _base_dtype(folder)
        if dtype is not None and dtype != lm.dtype:
            lm.model.to(dtype)
        mask_path = src.result.dir / "mask.safetensors" if src.realigned else src.result.mask_path
        zeros = zero_pattern(lm, mask_path)
        if zeros["pruned_not_zero"]:
            raise RuntimeError(f"{src.spec.where}: {zeros['pruned_not_zero']} weights of the mask are not zero "
                               "in the rebuilt model")
        lm.model.save_pretrained(tmp)
        copied = copy_base_files(folder, tmp) if folder is not None else {}
        if folder is None:  # tiny: the processor is built in code, so transformers writes its files
            lm.processor.save_pretrained(tmp)
        video = video_config(tmp, lm.model.config.model_type)
        if video is not None:
            atomic_write_json(tmp / VIDEO_CONFIG, video)
        del lm
        facts = collect(src, folder, zeros, copied, video is not None, fmt)
        facts["architecture"] = (read_json(tmp / "config.json").get("architectures") or [None])[0]
        if fmt == "compressed-tensors":
            from .compressed import compress_folder

            facts["compressed"] = compress_folder(tmp, src, facts)
        atomic_write_text(tmp / "README.md", model_card.render(facts))
        facts["files"] = {str(p.relative_to(tmp)): file_hash(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        atomic_write_json(tmp / "hsr_export.json", facts)
        for p in tmp.rglob("*"):
            if p.is_file():
                honour_umask(p)  # transformers writes some files with tempfile's mode 0600
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def collect(src: Source, folder: Path | None, zeros: dict[str, int], copied: dict[str, str], video: bool,
            fmt: str) -> dict[str, Any]:
    """Everything the card and ``hsr_export.json`` say, read from the run's artifacts."""
    from .steps import prune

    P, run = src.params, src.run
    kind = base_kind(P.model.name)
    pspec = prune.spec(P)
    pruned = src.result.pruned if src.realigned else src.result
    artifacts = {"prune": {"key": pspec.key, "files": artifact_files(run, pspec)}}
    realign = None
    if src.realigned:
        s = src.result.summary
        artifacts["realign"] = {"key": src.spec.key, "files": artifact_files(run, src.spec)}
        realign = {k: s.get(k) for k in ("variant", "heads", "top_h", "p", "q", "p_max", "seed", "region", "base_mask",
                                          "restored", "newly_nonzero", "survivors_overwritten", "survivors_changed",
                                          "decoder_linear_params", "restored_ratio_permyriad",
                                          "newly_nonzero_ratio_permyriad")}
        realign["ships_score"] = P.ships.score if s.get("variant") != "random_heads" else None
    ev = evaluation(src)
    if ev is not None:
        marker = read_json(run.dir / "evaluate" / ev["key"] / MARKER)
        artifacts["evaluate"] = {"key": ev["key"], "files": {n: r[2] for n, r in marker.get("files", {}).items()}}
    manifest = run.manifest()
    return {
        "format": "hsr-export-v1", "exported": _now(), "weights_format": fmt, "variant": src.variant,
        "kind": parse_variant(src.variant)[0], "run_dir": str(run.dir), "overrides": list(src.overrides),
        "fidelity": P.fidelity, "params": P.to_dict(),
        "base_model": {**base_identity(P.model.name, folder, P.seed), "license": base_license(folder, kind)},
        "copied_from_base": copied, "video_processor_config_written": video,
        "pruning": {"method": P.pruning.method, "sparsity": P.pruning.sparsity, "pattern": P.pruning.pattern,
                    "sparsity_reached": pruned.summary.get("sparsity_reached"),
                    "n_samples": pruned.summary.get("n_samples"), "key": pspec.key},
        "realign": realign, "artifacts": artifacts, "structure": structure(src), "zero_pattern": zeros,
        "evaluation": ev, "environment": environment(),
        "run_environment": {"versions": manifest.get("versions"), "git_commit": manifest.get("git_commit")},
    }


def summary_line(path: Path) -> str:
    """The terminal summary of a finished export: where, what, and the N:M share when the pattern is N:M."""
    facts = read_json(path / "hsr_export.json")
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    lines = [f"hsr export: {facts['variant']} -> {path} ({size / 1e6:.1f} MB, {facts['weights_format']})"]
    lines += [f"  {x}" for x in nm_sentences(facts)]
    return "\n".join(lines)


def nm_sentences(facts: dict[str, Any]) -> list[str]:
    """Plain sentences on the N:M structure of the exported weights (one per module type that lost
    some), or one sentence saying the pattern is unstructured or fully kept."""
    from .sparsity import parse_pattern

    st = facts["structure"]
    nm = parse_pattern(st["pattern"])
    if nm is None:
        return ["pattern unstructured: no N:M structure to keep or lose"]
    broken = [r for r in st["exported"] if r["blocks_below_n"]]
    if not broken:
        return [f"pattern {st['pattern']}: every block of {nm[1]} still holds at least {nm[0]} zeros (still {st['pattern']})"]
    return [f"pattern {st['pattern']}: {r['module_type']}: {100 * r['share_below_n']:.3f}% of its "
            f"{r['blocks']} blocks of {nm[1]} now hold fewer than {nm[0]} zeros (no longer {st['pattern']} there)"
            for r in broken]
