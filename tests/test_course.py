"""The course (docs/course.md): every check passes on the instructor's solutions, fails on the
student version's blank stubs (at the check, not earlier), and names the typical mistakes; the
student version keeps nothing of the solutions; the exercise notebooks execute on the toy."""

from __future__ import annotations

import time
from pathlib import Path

import nbformat
import pytest
import torch

from hsr_lib.course import CheckFailed, toy
from hsr_lib.course import heads as H
from hsr_lib.course import metrics as M
from hsr_lib.course import sets as S
from hsr_lib.course import wanda as W
from hsr_lib.course.student import BEGIN, END, SolutionMarkerError, is_solution, strip_code, student_notebook, write_student

ROOT = Path(__file__).resolve().parent.parent
EXERCISES = sorted((ROOT / "course" / "exercises").glob("[0-9][0-9]_*.ipynb"))


@pytest.fixture(scope="session")
def course_run(toy_run, tmp_path_factory):
    """The toy's course run (params/toy.yaml + the course's small evaluation), once per session, on a copy
    of the README run's folder: its upstream steps (data to realignment) have the same keys and are reused."""
    import shutil

    runs = tmp_path_factory.mktemp("course_runs")
    shutil.copytree(toy_run[0], runs / toy_run[0].name, ignore=shutil.ignore_patterns("notebooks"))
    run = toy.toy_run(runs)
    toy.evaluate(run)
    return runs, run


@pytest.fixture(scope="session")
def toy_lm(course_run):
    return toy.load_toy(course_run[1])


def definitions(path: Path, student: bool = False) -> dict:
    """Execute the solution cells of an exercise (or of its student version) into a namespace."""
    import pandas as pd

    from hsr_lib import steps
    from hsr_lib.toy_study import numbers

    nb = nbformat.read(path, as_version=4)
    if student:
        nb = student_notebook(nb)
    ns = {"torch": torch, "pd": pd, "toy": toy, "steps": steps, "numbers": numbers}
    for cell in nb.cells:
        if cell.cell_type == "code" and is_solution(cell):
            exec(compile(cell.source, f"{path.name}:{cell.id}", "exec"), ns)
    return ns


def nb(name: str) -> Path:
    return next(p for p in EXERCISES if p.name.startswith(name))


def test_course_five_exercises_with_markers_hints_and_checks():
    assert [p.name[:2] for p in EXERCISES] == ["01", "02", "03", "04", "05"]
    for path in EXERCISES:
        book = nbformat.read(path, as_version=4)
        text = [c.source for c in book.cells]
        assert any(BEGIN in t and END in t for t in text), path.name
        assert any("<details>" in t for t in text), path.name  # hints that unfold
        assert any("check_" in c.source for c in book.cells if c.cell_type == "code"), path.name
        assert all(not c.get("outputs") for c in book.cells if c.cell_type == "code"), f"{path.name}: outputs"
        assert any("parameters" in c.metadata.get("tags", []) for c in book.cells), path.name


# ----------------------------------------------------------------------------- solutions pass

@pytest.mark.slow
def test_course_checks_pass_on_solutions(course_run, toy_lm, capsys):
    runs, run = course_run
    ns = definitions(nb("01"))
    H.check_kv_head(ns["kv_head"])
    H.check_head_kl(ns["head_kl"], toy_lm, toy.harmful_prompts(run, toy_lm, 3))
    ns = definitions(nb("02"))
    name = "layers.1.mlp.up_proj"
    Wt, xs = toy_lm.prunable_linears()[name].weight.detach(), toy.calibration_inputs(run, toy_lm, name, 4)
    W.check_wanda_importance(ns["wanda_importance"], Wt, xs)
    W.check_masks(ns["unstructured_mask"], ns["nm_mask"], W.reference_wanda(Wt, xs))
    ns = definitions(nb("03"))
    mats = [S.toy_matrices(run, f"layers.0.self_attn.{k}") for k in ("q_proj", "o_proj")]
    S.check_top_fraction(ns["top_fraction"], mats[0]["S"])
    S.check_head_region(ns["head_region"])
    S.check_set_operation(ns["restore_set"], toy=mats)
    ns = definitions(nb("04"))
    M.check_asr(ns["asr"], toy.evaluate(run).scores())
    M.check_rsr(ns["rsr"])
    M.check_restored_ratio(ns["restored_ratio"], run)
    from hsr_lib.course.sweep import check_sweep

    ns = definitions(nb("05"))
    check_sweep(ns["sweep"], "realign.q", [0.5, 1.0], runs)
    out = capsys.readouterr().out
    assert out.count("✔") == 11, out


# ----------------------------------------------------------------------------- stubs fail

@pytest.mark.slow
def test_course_checks_fail_on_the_stubs(course_run, toy_lm):
    runs, run = course_run
    prompts = toy.harmful_prompts(run, toy_lm, 2)
    from hsr_lib.course.sweep import check_sweep

    calls = {
        "01": [lambda ns: H.check_kv_head(ns["kv_head"]),
               lambda ns: H.check_head_kl(ns["head_kl"], toy_lm, prompts, random_model=False)],
        "02": [lambda ns: W.check_wanda_importance(ns["wanda_importance"]),
               lambda ns: W.check_masks(ns["unstructured_mask"], ns["nm_mask"])],
        "03": [lambda ns: S.check_top_fraction(ns["top_fraction"]), lambda ns: S.check_head_region(ns["head_region"]),
               lambda ns: S.check_set_operation(ns["restore_set"])],
        "04": [lambda ns: M.check_asr(ns["asr"]), lambda ns: M.check_rsr(ns["rsr"]),
               lambda ns: M.check_restored_ratio(ns["restored_ratio"])],
        "05": [lambda ns: check_sweep(ns["sweep"], "realign.q", [0.5], runs)],
    }
    for num, checks in calls.items():
        ns = definitions(nb(num), student=True)
        for check in checks:
            with pytest.raises(CheckFailed, match="not written yet"):
                check(ns)


def run_until_failure(path: Path, runs_dir: Path) -> tuple[int, object, Exception | None]:
    """Execute the student version's cells in process, in order, until one raises: (index, cell, error)."""
    import matplotlib

    matplotlib.use("Agg")
    book = student_notebook(nbformat.read(path, as_version=4))
    ns: dict = {"__name__": "__main__"}
    for i, cell in enumerate(book.cells):
        if cell.cell_type != "code":
            continue
        src = f"runs_dir = {str(runs_dir)!r}" if "parameters" in cell.metadata.get("tags", []) else cell.source
        try:
            exec(compile(src, f"{path.name}[{i}]", "exec"), ns)
        except Exception as err:  # noqa: BLE001 - the first failure is what the test looks at
            return i, cell, err
    return -1, None, None


@pytest.mark.slow
@pytest.mark.parametrize("path", EXERCISES, ids=[p.stem for p in EXERCISES])
def test_course_student_notebook_fails_first_at_a_check(path, course_run):
    i, cell, err = run_until_failure(path, course_run[0])
    assert err is not None, f"{path.name}: the student version ran to the end with blank stubs"
    assert isinstance(err, CheckFailed) and "not written yet" in str(err), (path.name, i, repr(err))
    assert cell.metadata.get("nbgrader", {}).get("grade") and "check_" in cell.source, (path.name, i, cell.source)


# ----------------------------------------------------------------------------- typical mistakes

def _mistake(check, *args, match: str):
    with pytest.raises(CheckFailed, match=match) as info:
        check(*args)
    return str(info.value)


@pytest.mark.slow
def test_course_ex1_names_typical_mistakes(course_run, toy_lm):
    _, run = course_run
    prompts = toy.harmful_prompts(run, toy_lm, 2)
    ns = definitions(nb("01"))
    _mistake(H.check_kv_head, lambda h, n, nkv: h % nkv, match="round-robin")

    def no_key(lm, ps, layer, head, epsilon=1e-5):
        return H.reference_head_kl(lm, ps, layer, head, epsilon, parts=("q", "v")).float()

    msg = _mistake(H.check_head_kl, no_key, toy_lm, prompts, None, False, match="did not switch off the key")
    print(msg)

    def reversed_kl(lm, ps, layer, head, epsilon=1e-5):
        return H.reference_head_kl(lm, ps, layer, head, epsilon, reverse=True)

    _mistake(H.check_head_kl, reversed_kl, toy_lm, prompts, None, False, match="KL\\(p̃ ‖ p\\)")

    def leaves_hooks(lm, ps, layer, head, epsilon=1e-5):
        out = ns["head_kl"](lm, ps, layer, head, epsilon)
        attn = lm.adapter.attention(lm.model, layer)
        leaves_hooks.handle = attn.q_proj.register_forward_hook(lambda m, a, o: o * 0.5)
        return out

    try:
        _mistake(H.check_head_kl, leaves_hooks, toy_lm, prompts, None, False, match="still runs with a head")
    finally:
        leaves_hooks.handle.remove()


def test_course_ex2_names_typical_mistakes():
    def token_mean(Wm, xs):
        r = torch.cat(xs).pow(2).mean(0)
        return Wm.abs() * r.sqrt()[None, :]

    msg = _mistake(W.check_wanda_importance, token_mean, match="averaged over all")
    print(msg)
    _mistake(W.check_wanda_importance, lambda Wm, xs: Wm.abs() * (sum(x.pow(2).sum(0) for x in xs) / len(xs))[None, :],
             match="square root")

    def nm_ok(score, n, m):
        from hsr_lib.sparsity import prune_mask

        return prune_mask(score, n / m, f"{n}:{m}")

    def highest(score, s):
        k = int(score.shape[1] * s)
        return torch.zeros_like(score, dtype=torch.bool).scatter_(1, score.argsort(1, descending=True)[:, :k], True)

    _mistake(W.check_masks, highest, nm_ok, match="most important")

    def per_matrix(score, s):
        k = int(score.shape[1] * s) * score.shape[0]
        flat = torch.zeros(score.numel(), dtype=torch.bool)
        flat[score.reshape(-1).argsort()[:k]] = True
        return flat.view(score.shape)

    _mistake(W.check_masks, per_matrix, nm_ok, match="within each output row")
    from hsr_lib.sparsity import prune_mask

    _mistake(W.check_masks, lambda sc, s: ~prune_mask(sc, s), nm_ok, match="True where a weight is kept")
    _mistake(W.check_masks, lambda sc, s: prune_mask(sc, s),
             lambda sc, n, m: prune_mask(sc.T.contiguous(), n / m, f"{n}:{m}").T, match="run down the columns")


def test_course_ex3_names_typical_mistakes():
    from hsr_lib.realign import top_fraction

    def forgot_P(P, Sm, U, region, p, q, p_max):
        return top_fraction(Sm, q) & top_fraction(U, p_max) & ~top_fraction(U, p) & region

    msg = _mistake(S.check_set_operation, forgot_P, match="never pruned")
    print(msg)

    def whole_top(P, Sm, U, region, p, q, p_max):
        return P & top_fraction(Sm, q) & top_fraction(U, p_max) & region

    _mistake(S.check_set_operation, whole_top, match="remove T\\(U, p\\)")

    def per_row(X, f):
        k = int(f * X.shape[1])
        return torch.zeros_like(X, dtype=torch.bool).scatter_(1, X.topk(k, dim=1).indices, True)

    _mistake(S.check_top_fraction, per_row, match="each row")
    _mistake(S.check_top_fraction, lambda X, f: top_fraction(-X, f), match="smallest")

    ns = definitions(nb("03"))

    def o_rows(kind, shape, heads, n_heads, n_kv, d):
        return ns["head_region"]("q_proj" if kind == "o_proj" else kind, shape, heads, n_heads, n_kv, d)

    _mistake(S.check_head_region, o_rows, match="o_proj's \\*input\\*")

    def own_kv_rows(kind, shape, heads, n_heads, n_kv, d):
        return ns["head_region"](kind, shape, heads, n_heads, n_heads, d)

    _mistake(S.check_head_region, own_kv_rows, match="KV head")


@pytest.mark.slow
def test_course_ex4_names_typical_mistakes(course_run):
    _, run = course_run

    def fraction(v):
        d = [x for x in v if x is not None]
        return sum(d) / len(d)

    msg = _mistake(M.check_asr, fraction, match="percentage")
    print(msg)
    _mistake(M.check_asr, lambda v: 100 * sum(x or 0 for x in v) / len(v), match="undecided")
    _mistake(M.check_rsr, lambda p, h, d: 100 * (p - h) / (p - d), match="return None")
    _mistake(M.check_rsr, lambda p, h, d: None if p == d else 100 * (h - p) / (p - d), match="sign is flipped")

    def percent(restored, shapes):
        return sum(restored.values()) / sum(a * b for a, b in shapes.values()) * 100

    _mistake(M.check_restored_ratio, percent, match="per ten thousand")

    def touched(restored, shapes):
        return sum(restored.values()) / sum(shapes[k][0] * shapes[k][1] for k in restored) * 1e4

    _mistake(M.check_restored_ratio, touched, run, match="every decoder linear")


@pytest.mark.slow
def test_course_ex5_names_typical_mistakes(course_run):
    runs, _ = course_run
    from hsr_lib.course.sweep import check_sweep

    ns = definitions(nb("05"))

    def no_override(key, values, runs_dir):
        return ns["sweep"]("realign.p_max", [0.5] * len(values), runs_dir).assign(value=values)

    msg = _mistake(check_sweep, no_override, "realign.q", [0.1, 0.5], runs, match="did not reach the run")
    print(msg)

    def pruned_as_hsr(key, values, runs_dir):
        t = ns["sweep"](key, values, runs_dir)
        return t.assign(asr_hsr=t.asr_pruned)

    _mistake(check_sweep, pruned_as_hsr, "realign.q", [0.5], runs, match="pruned model's ASR")


# ----------------------------------------------------------------------------- the student version

def test_course_student_version_keeps_nothing_of_the_solutions(tmp_path):
    from hsr_lib.cli import main

    assert main(["course", "student", str(tmp_path / "student")]) == 0
    written = sorted((tmp_path / "student").glob("*.ipynb"))
    assert [p.name for p in written] == [p.name for p in EXERCISES]
    for src, dst in zip(EXERCISES, written):
        inst, stud = nbformat.read(src, as_version=4), nbformat.read(dst, as_version=4)
        nbformat.validate(stud)
        student_lines = {ln.strip() for c in stud.cells for ln in c.source.splitlines()}
        raw = dst.read_text()
        assert BEGIN not in raw and END not in raw
        secret = []
        for c in inst.cells:
            if c.cell_type == "code" and BEGIN in c.source:
                inside = False
                for ln in c.source.splitlines():
                    if BEGIN in ln or END in ln:
                        inside = BEGIN in ln
                    elif inside and len(ln.strip()) > 2:
                        secret.append(ln.strip())
            elif c.cell_type == "markdown" and is_solution(c):
                secret += [s.strip() for s in c.source.split(".")[1:] if len(s.strip()) > 20]
        assert secret, src.name
        public = "\n".join(strip_code(c.source) if c.cell_type == "code" else c.source
                           for c in inst.cells if c.cell_type == "code" or not is_solution(c))
        secret = [s for s in secret if s not in public]  # what the instructor version shows outside the blocks
        assert secret and all(s in "\n".join(c.source for c in inst.cells) for s in secret)  # found in the source
        leaked = [s for s in secret if s in student_lines or (len(s) > 20 and s in raw)]
        assert not leaked, (dst.name, leaked)
        assert raw.count("raise NotImplementedError()") == sum(c.source.count(BEGIN) for c in inst.cells)
        assert len(stud.cells) == len(inst.cells) and [c.id for c in stud.cells] == [c.id for c in inst.cells]


def test_course_student_markers_are_checked():
    assert strip_code("def f():\n    ### BEGIN SOLUTION\n    return 1\n    ### END SOLUTION") == \
        "def f():\n    # YOUR CODE HERE\n    raise NotImplementedError()"
    with pytest.raises(SolutionMarkerError, match="never closed"):
        strip_code(f"x = 1\n{BEGIN}\ny = 2")
    with pytest.raises(SolutionMarkerError, match="without"):
        strip_code(f"x = 1\n{END}")
    with pytest.raises(ValueError, match="must not overwrite"):
        write_student(EXERCISES[0].parent)


# ----------------------------------------------------------------------------- the notebooks run

CHECKS = {"01": 2, "02": 2, "03": 3, "04": 3, "05": 2}  # check cells' ✔ lines per exercise


def _execute(path: Path, out: Path, runs: Path) -> float:
    """Execute one exercise notebook with papermill as ``hsr`` starts kernels; its wall time in seconds."""
    import papermill as pm

    from hsr_lib.kernel import execute_options

    t0 = time.perf_counter()
    pm.execute_notebook(str(path), str(out), parameters={"runs_dir": str(runs)}, cwd=str(ROOT), progress_bar=False,
                        **execute_options())
    return round(time.perf_counter() - t0, 1)


@pytest.mark.notebooks
def test_course_notebooks_execute_on_the_toy(course_run, tmp_path):
    """Every exercise (instructor version) runs to the end on the toy, each check printing its ✔, with clean
    outputs; two at a time (kernel start and imports are most of a notebook's time)."""
    from concurrent.futures import ProcessPoolExecutor

    from test_notebook_hygiene import outputs, progress_problems, warning_lines

    runs, _ = course_run
    t0 = time.perf_counter()
    with ProcessPoolExecutor(2) as pool:
        walls = list(pool.map(_execute, EXERCISES, [tmp_path / p.name for p in EXERCISES], [runs] * len(EXERCISES)))
    times = dict(zip((p.stem for p in EXERCISES), walls))
    for path in EXERCISES:
        out = nbformat.read(tmp_path / path.name, as_version=4)
        text = "".join(o.get("text", "") for c in out.cells for o in c.get("outputs", []) if o.get("name") == "stdout")
        assert text.count("✔") == CHECKS[path.name[:2]], (path.name, text)
        text = outputs(tmp_path / path.name)
        problems = warning_lines(text) + progress_problems(text)
        assert not problems, (path.name, problems)
    print("course notebook times (s):", times, "wall, two at a time:", round(time.perf_counter() - t0, 1))
