"""The library's shape, checked on its source with the standard library's ``ast``: no import
cycle (imports inside functions count), no private name imported across modules, one definition
of the constants that used to be repeated, and pure method modules (no run directory)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "hsr_lib"
PURE = ("ablation", "adapters", "calibration", "data", "decoder", "masks", "models", "prompts", "prune", "realign",
        "scores", "ships", "ships_engine", "snip", "sparsegpt", "sparsity", "synthetic", "tiny")


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = ["hsr_lib", *path.relative_to(PKG).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODS = modules()


def is_package(name: str) -> bool:
    return MODS[name].name == "__init__.py"


def resolve(importer: str, node: ast.ImportFrom | ast.Import) -> list[tuple[str, list[str]]]:
    """``(module, names)`` pairs an import statement reaches inside hsr_lib."""
    if isinstance(node, ast.Import):
        return [(a.name, []) for a in node.names if a.name.split(".")[0] == "hsr_lib"]
    if node.level:
        base = importer.split(".")
        base = base if is_package(importer) else base[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "hsr_lib":
        return []
    out = [(target, [a.name for a in node.names])]
    for a in node.names:  # `from . import data` imports a submodule
        if f"{target}.{a.name}" in MODS:
            out.append((f"{target}.{a.name}", []))
    return out


def graph() -> tuple[dict[str, set[str]], list[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODS}
    private = []
    for name, path in MODS.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target, names in resolve(name, node):
                if target not in MODS:
                    continue
                # importing a submodule initialises its parent packages, unless the importer is inside them
                parts = target.split(".")
                for i in range(2, len(parts) + 1):
                    t = ".".join(parts[:i])
                    if t != name and not name.startswith(t + ".") and t in MODS:
                        edges[name].add(t)
                private += [f"{name} imports {target}.{n}" for n in names
                            if n.startswith("_") and not n.startswith("__") and target != name]
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges[v]:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_cycle_and_a_private_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    node = ast.parse("from .calibration import _progress").body[0]
    assert resolve("hsr_lib.prune", node) == [("hsr_lib.calibration", ["_progress"])]
    node = ast.parse("from . import data").body[0]
    assert ("hsr_lib.steps.data", []) in resolve("hsr_lib.steps", node)


def test_no_import_cycle():
    edges, _ = graph()
    assert cycles(edges) == []


def test_no_private_name_crosses_a_module():
    _, private = graph()
    assert private == []


def test_method_modules_are_pure():
    edges, _ = graph()
    for name in PURE:
        bad = {t for t in edges[f"hsr_lib.{name}"] if t in ("hsr_lib.runs", "hsr_lib.notebook", "hsr_lib.cli")
               or t.startswith("hsr_lib.steps")}
        assert not bad, f"hsr_lib.{name} imports {bad}"
        tree = ast.parse(MODS[f"hsr_lib.{name}"].read_text())
        assert not any(isinstance(n, ast.Name) and n.id == "Run" for n in ast.walk(tree)), name


def _literals(value) -> int:
    n = 0
    for path in MODS.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value == value:
                n += 1
            elif isinstance(node, ast.Tuple) and all(isinstance(e, ast.Constant) for e in node.elts) \
                    and tuple(e.value for e in node.elts) == value:
                n += 1
    return n


def test_repeated_constants_have_one_definition():
    assert _literals(("q_proj", "k_proj", "v_proj", "o_proj")) == 1  # adapters.ATTN_PARTS
    assert _literals(r"(\d+):(\d+)") == 1  # sparsity: the N:M pattern
    assert sum("reference_data" in p.read_text() for p in MODS.values()) == 1  # reference.py owns the data


def test_every_step_module_has_the_one_shape():
    from hsr_lib import steps

    for name, mod in steps.STEPS.items():
        assert mod.NAME == name
        for fn in ("spec", "run", "load"):
            assert callable(getattr(mod, fn)), f"{name}.{fn}"
        assert "upstream" in mod.run.__code__.co_varnames and "progress" in mod.run.__code__.co_varnames


def test_one_channel_into_a_kernel():
    """The run's options reach a notebook as papermill parameters, never through the environment."""
    names = ("HSR_VERIFY", "HSR_FORCE", "HSR_INVOCATION", "HSR_TEXT_PROGRESS")
    files = [*PKG.rglob("*.py"), *(PKG.parent / "notebooks").glob("*.ipynb")]
    assert len(files) > 40
    found = [f"{p.name}: {n}" for p in files for n in names if n in p.read_text()]
    assert found == []


def test_step_names_have_one_definition():
    from hsr_lib import steps
    from hsr_lib.preflight import STEP_OF_NOTEBOOK
    from hsr_lib.runs import STEP_NAMES

    assert tuple(steps.STEPS) == STEP_NAMES == tuple(STEP_OF_NOTEBOOK.values())
    assert _literals(STEP_NAMES) == 1
    assert sum(p.read_text().count("PATH_KEYS = ") for p in MODS.values()) == 1
    assert sum(p.read_text().count("class PruneResult") for p in MODS.values()) == 1
