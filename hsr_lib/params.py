"""Typed, documented run parameters: YAML files merged over the defaults of the fidelity mode.

``load_params(path, overrides)`` reads ``fidelity`` first (overrides, then the file chain, else
"paper"), takes that mode's defaults, then applies the files (``extends:`` bases first) and
the overrides. Every value is checked; a bad one raises :class:`ParamsError` naming the dotted
key and where it came from (a file path or "override"). Paths are kept as given, not resolved.
YAML numbers follow YAML 1.2: ``1e-5`` is a float and ``2:4`` a string (PyYAML's 1.1 default
would read them as a string and the base-60 integer 124).
"""

from __future__ import annotations

import copy
import difflib
import re
import types
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence, Union, get_args, get_origin, get_type_hints

import yaml

from .io import atomic_write_text, stable_hash
from .sparsity import check_sparsity, parse_pattern

__all__ = ["ParamsError", "Params", "load_params", "describe", "PARAM_DOCS",
           "REFERENCE_DEFAULTS", "SECTIONS"]


def _yaml12(cls: type) -> type:
    """YAML 1.2 numbers for a PyYAML loader/dumper: ``1e-5`` is a float, ``2:4`` a string (not base 60)."""
    cls.yaml_implicit_resolvers = {c: [(t, r) for t, r in rs if not t.endswith((":int", ":float"))]
                                   for c, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    cls.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0x[0-9a-fA-F_]+)$"),
                              list("-+0123456789"))
    cls.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
        list("-+0123456789."))
    return cls


@_yaml12
class _Loader(yaml.SafeLoader):
    """Safe YAML loader with YAML 1.2 numbers that refuses a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"found the key {key!r} twice "
                    f"(first on line {seen[key].line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    """Safe YAML dumper that quotes strings YAML 1.1 (yaml.safe_load) or _Loader would read otherwise."""

    def resolve(self, kind: Any, value: Any, implicit: Any) -> str:
        tag = super().resolve(kind, value, implicit)
        if kind is yaml.ScalarNode and implicit[0] and tag == "tag:yaml.org,2002:str" and value:
            tag = next((t for t, rx in _Loader.yaml_implicit_resolvers.get(value[0], []) if rx.match(value)), tag)
        return tag


def _yaml_error(e: yaml.YAMLError) -> str:
    """A YAML error as one line: where (line, column) and what."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = getattr(e, "problem", None) or str(e)
    context = getattr(e, "context", None)
    return " ".join(f"{where}{what}{f' ({context})' if context else ''}".split())


def _yaml_load(text: str) -> Any:
    """Parse YAML text with _Loader."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


class ParamsError(ValueError):
    """A bad params file or override; the message names the key and its source."""


Check = Callable[[Any], "str | None"]


def _f(default: Any, doc: str, check: str | Check | None = None) -> Any:
    """A dataclass field with a one-line ``doc`` and a check: an interval like "[0, 1)" or a callable."""
    if isinstance(check, str):
        check = _interval(check)
    meta = {"doc": doc, "check": check}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata=meta)
    return field(default=default, metadata=meta)


def _interval(spec: str) -> Check:
    """Check for numbers in an interval "[lo, hi)" ("inf" for no bound); non-numbers pass."""
    lo, hi = (float(x) for x in spec[1:-1].split(","))
    text = f"in {spec}" if hi != float("inf") else f"{'>' if spec[0] == '(' else '>='} {spec[1:].split(',')[0]}"

    def check(v: Any) -> str | None:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return None  # "auto" passes; types were checked before
        ok = (v > lo if spec[0] == "(" else v >= lo) and (v < hi if spec[-1] == ")" else v <= hi)
        return None if ok else f"must be {text} (got {v!r})"
    return check


def _subset(choices: Sequence[str], nonempty: bool = False) -> Check:
    """Check that a list only holds ``choices``, without repeats."""
    def check(v: list) -> str | None:
        if bad := [x for x in v if x not in choices]:
            return f"must only hold {', '.join(map(repr, choices))} (got {bad[0]!r})"
        if len(set(v)) != len(v):
            return f"must not repeat entries (got {v!r})"
        return "must not be empty" if nonempty and not v else None
    return check


def _pattern(v: str) -> str | None:
    """Check pruning.pattern: 'unstructured' or 'N:M' with 0 < N < M."""
    try:
        parse_pattern(v)
    except ValueError:
        return f"must be 'unstructured' or 'N:M' with integers 0 < N < M (got {v!r})"
    return None


def _plain_name(v: str) -> str | None:
    """Check run_name: a folder name, not a path."""
    bad = not v.strip() or v in (".", "..") or any(c in v for c in "/\\\0") or v != v.strip()
    return f"must be a plain folder name, without path separators (got {v!r})" if bad else None


def _device(v: str) -> str | None:
    """Check model.device."""
    ok = re.fullmatch(r"auto|cpu|cuda|cuda:\d+", v)
    return None if ok else f"must be 'auto', 'cpu', 'cuda' or 'cuda:<int>' (got {v!r})"


@dataclass(frozen=True)
class ModelParams:
    """Which checkpoint to load and how."""
    name: str = _f("tiny:qwen2_5_vl", "HF model id, local path, or tiny:<family> (random weights, for tests)")
    family: Literal["auto", "llava_next", "qwen2_vl", "qwen2_5_vl", "mllama"] = _f("auto", "adapter (auto: detect)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f("auto", "dtype the weights are loaded in")
    device: str = _f("auto", "device: auto, cpu, cuda or cuda:<int>", _device)
    attn_implementation: Literal["eager", "sdpa"] = _f("sdpa", "attention kernel of the language model")


@dataclass(frozen=True)
class DataParams:
    """Where the VLGuard data is and how many records each step samples."""
    vlguard_root: str | None = _f(None, "folder of a VLGuard download (holds train.json); null: synthetic data")
    train_json: str = _f("train.json", "annotation file, relative to vlguard_root")
    image_root: str | None = _f(None, "folder the records' image paths are relative to (null: vlguard_root/train "
                                "when it exists, else vlguard_root)")
    allow_outside_root: bool = _f(False, "accept image paths that resolve outside their root (symlinks followed)")
    synthetic: Literal["generic", "toy"] = _f("generic", "without vlguard_root: the generic synthetic set, or the "
                                              "teaching toy's world (shapes to describe, requests to refuse)")
    n_synthetic: int = _f(48, "records of the generic synthetic VLGuard-shaped set", "[4, inf)")
    n_ships: Literal["all"] | int = _f(128, "harmful prompts sampled for the Ships head scores (all: every one)",
                                       "[1, inf)")
    seed_ships: int = _f(114514, "sampling seed of the Ships prompts")
    n_scores: Literal["all"] | int = _f(128, "calibration samples per set (safety, utility) for importance scores "
                                        "(all: every record)", "[1, inf)")
    seed_scores: int = _f(0, "sampling seed of the calibration samples")


@dataclass(frozen=True)
class ShipsParams:
    """Head-level safety scores (Ships): ablate each head, measure the change."""
    score: Literal["kl", "subspace", "hidden0_angle"] = _f("subspace", "head score (hidden0_angle: released code)")
    epsilon: float = _f(1e-5, "factor the ablated head's slices are scaled by", "(0, inf)")
    parts: list[str] = _f(["q", "k", "v"], "projections of the head that are ablated", _subset(["q", "k", "v"], True))
    r_max: int = _f(1, "subspace score: number of top singular vectors compared", "[1, inf)")
    gqa_slot_bug: bool = _f(False, "under GQA scale output slot g instead of head h (released code's bug)")
    non_causal: bool = _f(False, "run attention non-causally (as the released code did under SDPA)")
    batch_heads: Literal["auto"] | int = _f("auto", "heads ablated per batched forward (auto: by memory)", "[1, inf)")
    dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", "dtype of the Ships forward passes")


@dataclass(frozen=True)
class ScoresParams:
    """Importance scores (Wanda/SparseGPT/SNIP) on the dense model."""
    offload_layers: bool = _f(False, "decoder layers live on the CPU and visit the accelerator one at a time")
    batch_size: int = _f(1, "calibration samples per forward (left-padded; SNIP always runs one at a time)",
                         "[1, inf)")
    methods: list[str] = _f([], "methods scored besides pruning.method (e.g. [wanda, sparsegpt, snip])",
                            _subset(["wanda", "sparsegpt", "snip"]))
    save_dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", "dtype the score tensors are stored in")


@dataclass(frozen=True)
class PruningParams:
    """How the model is pruned."""
    method: Literal["wanda", "sparsegpt", "snip"] = _f("wanda", "pruning method")
    sparsity: float = _f(0.5, "fraction of each prunable matrix set to zero", "[0, 1)")
    pattern: str = _f("unstructured", "unstructured, or N:M (N of every M inputs zeroed)", _pattern)
    sequential: bool = _f(True, "calibrate layer i on the outputs of the already pruned layers")
    blocksize: int = _f(128, "SparseGPT: columns per lazy OBS block", "[1, inf)")
    percdamp: float = _f(0.01, "SparseGPT: damping, fraction of mean(diag H)", "(0, inf)")
    save_model: bool = _f(False, "also save the pruned model as an HF model directory (<run>/prune/model)")


@dataclass(frozen=True)
class RealignParams:
    """Neuron-level realignment inside the top Ships heads."""
    variant: Literal["hsr", "hsr_a", "random_heads"] = _f("hsr", "hsr, hsr_a (whole head regions) or random_heads")
    top_h: int = _f(10, "number of top Ships heads realigned", "[1, inf)")
    p: float = _f(0.5, "utility fraction p: the top p by utility score are kept by pruning", "[0, 1]")
    q: float = _f(0.5, "safety fraction q: candidates are the top q by safety score", "(0, 1]")
    p_max: float = _f(0.7, "candidates lie inside the top p_max by utility score (p <= p_max)", "[0, 1]")
    region: Literal["paper", "reference"] = _f("paper", "head region: its own rows/columns, or input-column bands")
    base_mask: Literal["actual", "rederived"] = _f("actual", "pruned mask P: actual, or re-derived from utility scores")
    seed: int = _f(0, "seed of the random_heads variant")
    save_model: bool = _f(False, "also save the realigned model's weights")


EVAL_BENCHMARKS = ("safebench", "ch3ef", "mmbench", "docvqa", "vlguard_unsafe", "vlguard_safe_unsafe", "vlguard_safe_safe",
                   "toy_harmful", "toy_harmful_novel", "toy_unsafe_image", "toy_benign")


def _data_roots(v: dict) -> str | None:
    """Check eval.data_roots: keys are benchmark names (or 'vlguard', shared by both VLGuard subsets)."""
    known = (*EVAL_BENCHMARKS, "vlguard")
    bad = [k for k in v if k not in known]
    return f"keys must be benchmark names: {', '.join(map(repr, known))} (got {bad[0]!r})" if bad else None


_VARIANT = re.compile(r"(dense|pruned|hsr|hsr_a|random_heads)(?:@(\d+))?")
VARIANT_HELP = "dense, pruned, hsr, hsr_a, random_heads (seed realign.seed) or random_heads@<seed>"


def parse_variant(name: str) -> tuple[str, int | None]:
    """``(kind, seed)`` of an evaluated variant's name; ValueError naming it when it is not one."""
    m = _VARIANT.fullmatch(str(name))
    if not m or (m[2] is not None and m[1] != "random_heads"):
        raise ValueError(f"unknown variant {name!r}; variants: {VARIANT_HELP}")
    return m[1], None if m[2] is None else int(m[2])


def _variants(v: list) -> str | None:
    """Check eval.variants: known names, no repeats, not empty."""
    for x in v:
        try:
            parse_variant(x)
        except ValueError:
            return f"must only hold {VARIANT_HELP} (got {x!r})"
    if len(set(v)) != len(v):
        return f"must not repeat entries (got {v!r})"
    return "must not be empty" if not v else None


@dataclass(frozen=True)
class EvalParams:
    """Generation, refusal judges and benchmarks of notebook 06 (docs/method.md)."""
    variants: list[str] = _f(["dense", "pruned", "hsr"], "model variants evaluated: " + VARIANT_HELP, _variants)
    max_new_tokens: int = _f(64, "greedy decoding length", "[1, inf)")
    batch_size: int = _f(8, "prompts per generation batch", "[1, inf)")
    judges: list[str] = _f(["vlguard"], "refusal judges: vlguard, wei, gcg (keywords), llm; the first fills the "
                           "results table", _subset(["vlguard", "wei", "gcg", "llm"], True))
    llm_judge_path: str | None = _f(None, "local path of the LLM judge (required when judges holds llm)")
    benchmarks: list[str] = _f(["safebench", "ch3ef", "mmbench", "docvqa"],
                               "benchmarks evaluated: " + ", ".join(EVAL_BENCHMARKS), _subset(EVAL_BENCHMARKS, True))
    data_roots: dict[str, str] = _f({}, "benchmark name -> folder (or file) of its data", _data_roots)
    n_items: int | None = _f(None, "items per benchmark, the first n in file order (null: all)", "[1, inf)")
    mmbench_circular: bool = _f(False, "MMBench circular evaluation: right only if every rotation of the options is")


SECTIONS: dict[str, type] = {"model": ModelParams, "data": DataParams, "ships": ShipsParams, "scores": ScoresParams,
                             "pruning": PruningParams, "realign": RealignParams, "eval": EvalParams}
TOP_KEYS = ("run_name", "runs_dir", "fidelity", "seed")


@dataclass(frozen=True)
class Params:
    """All parameters of a run; sections are attributes (``P.pruning.sparsity``)."""
    run_name: str = _f("tiny", "name of the run directory under runs_dir (a plain name)", _plain_name)
    runs_dir: str = _f("runs", "folder holding the run directories")
    fidelity: Literal["paper", "reference"] = _f("paper", "paper (the text) or reference (the released code)")
    seed: int = _f(0, "global seed")
    model: ModelParams = field(default_factory=ModelParams)
    data: DataParams = field(default_factory=DataParams)
    ships: ShipsParams = field(default_factory=ShipsParams)
    scores: ScoresParams = field(default_factory=ScoresParams)
    pruning: PruningParams = field(default_factory=PruningParams)
    realign: RealignParams = field(default_factory=RealignParams)
    eval: EvalParams = field(default_factory=EvalParams)
    source: str | None = field(default=None, compare=False)  # the params file loaded, if any

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of every key (JSON-able; ``source`` left out)."""
        return {k: v for k, v in asdict(self).items() if k != "source"}

    def get(self, key: str) -> Any:
        """Value of a dotted key (``"pruning.sparsity"``) or a section (``"pruning"``)."""
        if key not in _FIELDS and key not in SECTIONS:
            raise ParamsError(f"get: {_unknown(key)}")
        obj: Any = self
        for part in key.split("."):
            obj = getattr(obj, part)
        return obj

    def fingerprint(self, *names: str) -> str:
        """stable_hash of the named sections/keys (e.g. "pruning", "fidelity"); none named: all."""
        names = names or tuple(self.to_dict())
        return stable_hash({n: (asdict(v) if is_dataclass(v) else v)
                            for n in names for v in [self.get(n)]})

    def replace(self, overrides: Mapping[str, Any]) -> "Params":
        """These params with dotted-key ``overrides`` applied and checked (every other value kept as is)."""
        d = self.to_dict()
        for key, value in overrides.items():
            section, _, name = key.rpartition(".")
            if key not in _FIELDS:
                raise ParamsError(f"replace: {_unknown(key)}")
            (d[section] if section else d)[name] = value
        return load_params(None, overrides=d)

    def save(self, path: str | Path) -> Path:
        """Write the resolved params as YAML, atomically; ``load_params(path)`` gives them back."""
        head = f"# Resolved params{' of ' + self.source if self.source else ''} (hsr_lib.params)\n"
        return atomic_write_text(path, head + yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False,
                                                        allow_unicode=True))


def _registry() -> dict[str, tuple[Any, Any]]:
    """Every dotted key -> (type hint, dataclass field)."""
    reg: dict[str, tuple[Any, Any]] = {}
    hints = get_type_hints(Params)
    for f in fields(Params):
        if f.name in TOP_KEYS:
            reg[f.name] = (hints[f.name], f)
        elif f.name in SECTIONS:
            sh = get_type_hints(SECTIONS[f.name])
            reg.update({f"{f.name}.{g.name}": (sh[g.name], g) for g in fields(SECTIONS[f.name])})
    return reg


_FIELDS = _registry()
PARAM_DOCS: dict[str, str] = {k: f.metadata["doc"] for k, (_, f) in _FIELDS.items()}
REFERENCE_DEFAULTS: dict[str, Any] = {"ships.score": "hidden0_angle", "ships.gqa_slot_bug": True,
                                      "realign.region": "reference", "realign.base_mask": "rederived"}


def _default(key: str, fidelity: str) -> Any:
    """Default of ``key`` in the given fidelity mode."""
    if key == "fidelity":
        return fidelity
    if fidelity == "reference" and key in REFERENCE_DEFAULTS:
        return REFERENCE_DEFAULTS[key]
    f = _FIELDS[key][1]
    return f.default_factory() if f.default is MISSING else f.default


_PLAIN = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}


def _tname(tp: Any) -> str:
    """Readable name of a type hint."""
    o, a = get_origin(tp), get_args(tp)
    if o is Literal:
        return repr(a[0]) if len(a) == 1 else "one of " + ", ".join(map(repr, a))
    if o in (Union, types.UnionType):
        return " or ".join(_tname(t) for t in a)
    if o is list:
        return f"a list of {_PLAIN[a[0]]}s"
    if o is dict:
        return f"a mapping of {_PLAIN[a[0]]}s to {_PLAIN[a[1]]}s"
    return "null" if tp is type(None) else ("an " if tp is int else "a ") + _PLAIN[tp]


class _Bad(Exception):
    """Internal: a value that does not fit its type."""


def _coerce(v: Any, tp: Any) -> Any:
    """``v`` as type ``tp`` (int -> float allowed, bool is not int, str is not list) or raise _Bad."""
    o, a = get_origin(tp), get_args(tp)
    if o is Literal and any(type(v) is type(x) and v == x for x in a):
        return v
    for t in a if o in (Union, types.UnionType) else ():
        try:
            return _coerce(v, t)
        except _Bad:
            pass
    try:
        if o is list and isinstance(v, (list, tuple)):
            return [_coerce(x, a[0]) for x in v]
        if o is dict and isinstance(v, Mapping):
            return {_coerce(k, a[0]): _coerce(x, a[1]) for k, x in v.items()}
    except _Bad:
        pass
    if o is None and isinstance(v, (float, int) if tp is float else tp) and (tp is bool or not isinstance(v, bool)):
        return float(v) if tp is float else v
    raise _Bad(f"must be {_tname(tp)} (got {v!r})")


def _suggest(key: str) -> str:
    """' did you mean ...?' for an unknown key, or ''."""
    last = key.rpartition(".")[2]
    hits = [k for k in _FIELDS if k.rpartition(".")[2] == last] or difflib.get_close_matches(key, _FIELDS, 1) \
        or [k for k in _FIELDS if difflib.get_close_matches(last, [k.rpartition(".")[2]], 1, 0.75)][:1]
    return f"; did you mean {' or '.join(map(repr, hits))}?" if hits else ""


def _unknown(key: str, section: bool = False) -> str:
    """Message for a key that is not a parameter (``section``: its value is a mapping)."""
    head, _, rest = key.partition(".")
    if (rest or section) and head not in SECTIONS:
        hint = difflib.get_close_matches(head, SECTIONS, 1)
        more = f"; did you mean {hint[0]!r}?" if hint else _suggest(head) or f"; sections are {', '.join(SECTIONS)}"
        return f"unknown section {head!r}{more}"
    if key == "extends":
        return "'extends' is only allowed at the top level of a params file"
    return f"unknown key {key!r}" + _suggest(key)


def _flatten(m: Mapping, src: str, prefix: str = "") -> dict[str, Any]:
    """Nested and/or dotted mapping -> {dotted key: raw value}; unknown keys raise."""
    out: dict[str, Any] = {}
    for k, v in m.items():
        if not isinstance(k, str):
            raise ParamsError(f"{src}: {prefix}{k!r}: keys must be strings")
        key = prefix + k.strip()
        if key in _FIELDS:
            out[key] = v
        elif not prefix and key in SECTIONS:
            if not isinstance(v, (Mapping, type(None))):
                raise ParamsError(f"{src}: {key}: a section must be a mapping of keys to values (got {v!r})")
            out.update(_flatten(v or {}, src, key + "."))
        else:
            raise ParamsError(f"{src}: {_unknown(key, not prefix and isinstance(v, Mapping))}")
    return out


def _read_chain(path: Path, stack: tuple[Path, ...] = ()) -> list[tuple[str, dict[str, Any]]]:
    """Layers [(source, flat values)] of a params file, its ``extends`` bases first."""
    src = str(path)
    try:
        data = _yaml_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ParamsError(f"{src}: cannot read params file ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ParamsError(f"{src}: not a UTF-8 text file (byte {e.start}: {e.reason})") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{src}: not valid YAML: {_yaml_error(e)}") from None
    if not data:
        raise ParamsError(f"{src}: the params file is empty; give at least one key (or extends: a base file), "
                          "e.g. copy params/tiny.yaml")
    if not isinstance(data, dict):
        raise ParamsError(f"{src}: a params file must be a mapping of keys to values "
                          f"(got {type(data).__name__})")
    base, layers = data.pop("extends", None), []
    if base is not None:
        if not isinstance(base, str):
            raise ParamsError(f"{src}: extends: must be a string path (got {base!r})")
        bpath = path.parent / base
        if not bpath.is_file():
            raise ParamsError(f"{src}: extends: file not found: {bpath}")
        chain = stack + (path.resolve(),)
        if bpath.resolve() in chain:
            raise ParamsError(f"{src}: extends: cycle " + " -> ".join(str(p) for p in chain + (bpath.resolve(),)))
        layers = _read_chain(bpath, chain)
    return layers + [(src, relative_to(_flatten(data, src), path.parent))]


PATH_KEYS = ("runs_dir", "data.vlguard_root", "data.image_root", "eval.llm_judge_path")  # and eval.data_roots' values


def _absolute(v: Any, base: Path) -> Any:
    """A path value made absolute against ``base`` (None, '' and absolute paths are kept)."""
    if not isinstance(v, str) or not v:
        return v
    p = Path(v).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def relative_to(flat: dict[str, Any], base: Path) -> dict[str, Any]:
    """The path keys of one layer made absolute against ``base``: the folder of the params file
    that sets them (the current directory for overrides and defaults)."""
    out = dict(flat)
    for key in PATH_KEYS:
        if key in out:
            out[key] = _absolute(out[key], base)
    if isinstance(out.get("eval.data_roots"), Mapping):
        out["eval.data_roots"] = {k: _absolute(v, base) for k, v in out["eval.data_roots"].items()}
    return out


def resolve_paths(params: "Params", base: str | Path | None = None) -> "Params":
    """``params`` with every path key absolute against ``base`` (default: the current directory);
    ``model.name`` becomes absolute only when it names an existing local folder."""
    base = Path(base or Path.cwd())
    flat = relative_to({k: params.get(k) for k in (*PATH_KEYS, "eval.data_roots")}, base)
    name = params.model.name
    if not name.startswith(("tiny:", "toy:")) and (base / name).is_dir():
        flat["model.name"] = _absolute(name, base)
    return params.replace(flat)


def _parse_overrides(overrides: Sequence[str] | Mapping[str, Any] | str | None) -> dict[str, Any]:
    """"KEY=VALUE" strings (VALUE read as YAML) or a dotted/nested dict -> flat values."""
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        return _flatten(overrides, "override")
    raw: dict[str, Any] = {}
    for item in [overrides] if isinstance(overrides, str) else overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ParamsError(f"override: {item!r} is not KEY=VALUE (e.g. pruning.sparsity=0.6)")
        key, _, text = item.partition("=")
        try:
            value = _yaml_load(text)
        except yaml.YAMLError as e:
            raise ParamsError(f"override: {key.strip()}: value {text!r} is not valid YAML: {e}") from None
        plain_str = _FIELDS.get(key.strip(), (None,))[0] is str  # run_name=2024 means the string
        raw[key.strip()] = text.strip() if plain_str and not isinstance(value, str) and value is not None else value
    return _flatten(raw, "override")


def _checked(key: str, value: Any, src: str) -> Any:
    """``value`` coerced to ``key``'s type and range-checked, or ParamsError."""
    tp, f = _FIELDS[key]
    try:
        v = _coerce(value, tp)
    except _Bad as e:
        raise ParamsError(f"{src}: {key}: {e}") from None
    msg = f.metadata["check"](v) if f.metadata["check"] and v is not None else None
    if msg:
        raise ParamsError(f"{src}: {key}: {msg}")
    return v


def _cross_check(flat: dict[str, Any], origin: dict[str, str]) -> None:
    """Rules that involve several keys."""
    def blame(*keys: str) -> str:
        return next((origin[k] for k in keys if origin[k] != "default"), "default")

    p, p_max = flat["realign.p"], flat["realign.p_max"]
    if p > p_max:
        raise ParamsError(f"{blame('realign.p', 'realign.p_max')}: realign.p: must be <= realign.p_max "
                          f"(got realign.p = {p} from {origin['realign.p']}, "
                          f"realign.p_max = {p_max} from {origin['realign.p_max']})")
    try:
        check_sparsity(flat["pruning.sparsity"], flat["pruning.pattern"])
    except ValueError:
        n, m = parse_pattern(flat["pruning.pattern"])
        raise ParamsError(f"{blame('pruning.pattern', 'pruning.sparsity')}: pruning.sparsity: pruning.pattern "
                          f"{flat['pruning.pattern']!r} needs pruning.sparsity = {n / m} "
                          f"(got {flat['pruning.sparsity']})") from None
    if "llm" in flat["eval.judges"] and flat["eval.llm_judge_path"] is None:
        raise ParamsError(f"{blame('eval.judges', 'eval.llm_judge_path')}: eval.llm_judge_path: "
                          "required when eval.judges holds 'llm'")


def load_params(path: str | Path | None = None,
                overrides: Sequence[str] | Mapping[str, Any] | None = None) -> Params:
    """Defaults of the fidelity mode, then the params file chain at ``path``, then ``overrides``."""
    layers = _read_chain(Path(path)) if path is not None else []
    layers.append(("override", relative_to(_parse_overrides(overrides), Path.cwd())))
    fidelity, fsrc = "paper", "default"
    for src, layer in layers:  # later layers win: overrides, then the leaf file, then its bases
        if "fidelity" in layer:
            fidelity, fsrc = layer["fidelity"], src
    fidelity = _checked("fidelity", fidelity, fsrc)
    flat = {k: _default(k, fidelity) for k in _FIELDS}
    origin = dict.fromkeys(_FIELDS, "default")
    for src, layer in layers:
        for key, value in layer.items():
            flat[key], origin[key] = _checked(key, value, src), src
    _cross_check(flat, origin)
    secs = {s: cls(**{k.partition(".")[2]: v for k, v in flat.items() if k.partition(".")[0] == s})
            for s, cls in SECTIONS.items()}
    return Params(**{k: flat[k] for k in TOP_KEYS}, **secs, source=None if path is None else str(path))


def describe(params: Params | None = None) -> list[dict[str, Any]]:
    """One row per key: key, type, default (paper), reference default, doc (+ value of ``params``)."""
    rows = []
    for key, (tp, f) in _FIELDS.items():
        row = {"key": key, "type": _tname(tp), "default": _default(key, "paper"),
               "reference_default": _default(key, "reference"), "doc": f.metadata["doc"]}
        if params is not None:
            row["value"] = params.get(key)
        rows.append(row)
    return rows
