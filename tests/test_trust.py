"""A run directory you can trust: every bad input and fault of the issue's table gives a one-line
message naming the key, file, record or path, and leaves a finished run untouched; corrupted
artifacts are never used; a lock keeps one writer per key; a copied run resumes with nothing
recomputed; a run killed with SIGKILL resumes to the same artifacts."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import LIB_OVERRIDES, ROOT, TINY
from test_cli import _notebook
from hsr_lib import steps
from hsr_lib.cli import main
from hsr_lib.io import UMASK, read_json
from hsr_lib.params import ParamsError, load_params
from hsr_lib.preflight import InputError, check
from hsr_lib.runs import LockHeld, Run, Spec


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (lock files aside) with its content hash."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith((".lock", ".holder.json"))}


def markers(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in folder.glob("*/*/_step.json")}


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "hsr"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "hsr_lib.cli"]
    return subprocess.run([*cmd, *args], cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                          text=True, timeout=600)


def lib_args(run) -> list[str]:
    """``hsr run`` arguments that address the keys of the shared library run."""
    out = ["run", str(TINY), "-p", f"runs_dir={run.dir.parent}", "-p", "run_name=lib"]
    for k, v in LIB_OVERRIDES.items():
        out += ["-p", f"{k}={json.dumps(v)}"]
    return out


def one_line(proc) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# ------------------------------------------------------------------ integrity


def test_a_truncated_artifact_is_named_and_recomputed(run_copy, capsys):
    run = run_copy()
    prune = steps.prune.load(run)
    good = prune.mask_path.read_bytes()
    before = markers(run.dir)
    prune.mask_path.write_bytes(good[: len(good) // 2])
    res = steps.realign.run(run, progress=False)  # reads the pruning: it is checked first
    out = capsys.readouterr().out
    assert f"{prune.mask_path} changed since it was written" in out and "recomputing it" in out
    assert prune.mask_path.read_bytes() == good  # recomputed, identical
    changed = {k for k in markers(run.dir) if markers(run.dir)[k] != before.get(k)}
    assert {k.split("/")[0] for k in changed} == {"prune"} and res.summary["restored"] > 0


def test_a_zeroed_but_valid_mask_is_caught_by_its_hash(run_copy, capsys):
    run = run_copy()
    prune = steps.prune.load(run)
    good, st = prune.mask_path.read_bytes(), prune.mask_path.stat()
    header = 8 + int.from_bytes(good[:8], "little")  # safetensors: header length, header, then data
    zeroed = good[:header] + bytes(len(good) - header)
    prune.mask_path.write_bytes(zeroed)
    os.utime(prune.mask_path, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with its old modification time …
    assert run.is_done(steps.prune.spec(run.params))  # … the fast check cannot see it,
    verified = Run(run.params, run.dir, verify=True)
    assert not verified.is_done(steps.prune.spec(run.params))  # --verify does
    assert "content hash differs" in capsys.readouterr().out
    prune.mask_path.write_bytes(zeroed)  # a new modification time: re-hashed without --verify
    assert not run.is_done(steps.prune.spec(run.params))
    steps.prune.run(run, progress=False)
    assert prune.mask_path.read_bytes() == good


def test_force_recomputes_once_per_invocation(run_copy):
    run = run_copy()
    forced = Run(run.params, run.dir, force=("prune",), token="invocation-1")
    before = steps.prune.load(run).summary
    assert not forced.is_done(steps.prune.spec(run.params))
    steps.prune.run(forced, progress=False)
    assert forced.is_done(steps.prune.spec(run.params))  # done for the rest of this invocation
    assert not Run(run.params, run.dir, force=("all",), token="invocation-2").is_done(steps.data.spec(run.params))
    assert steps.prune.load(run).summary["sparsity_reached"] == before["sparsity_reached"]


# ------------------------------------------------------------------ failure isolation


@pytest.mark.parametrize("flags", [["--from", "09"], ["--from", "05", "--to", "02"]])
def test_an_invalid_selection_writes_nothing(run_copy, flags):
    run = run_copy()
    before = snapshot(run.dir)
    proc = cli(*lib_args(run), "-p", "pruning.sparsity=0.3", *flags)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert snapshot(run.dir) == before


def test_a_corrupt_image_fails_the_data_step_and_keeps_the_good_sets(tmp_path):
    from test_runs import _tiny_vlguard

    vg = tmp_path / "vg"
    _tiny_vlguard(vg)
    P = load_params(TINY, {"runs_dir": str(tmp_path / "runs"), "data.vlguard_root": str(vg), "data.n_ships": "all",
                           "data.n_scores": "all"})
    run = Run.open(P)
    good = steps.data.run(run, progress=False)
    before = snapshot(good.dir)
    (vg / "img" / "2.png").write_bytes(b"not a png")
    from hsr_lib.data import DataError

    with pytest.raises(DataError, match=r"record id 's2'.*cannot read image"):
        steps.data.run(Run(P, run.dir, force=("data",), token="t"), progress=False)
    assert snapshot(good.dir) == before


@pytest.mark.notebooks
def test_a_failed_notebook_keeps_the_last_good_copy_and_a_held_lock_exits_3(tmp_path):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _notebook(nbs / "01_x.ipynb", "print('good')")
    args = ["run", str(TINY), "-p", f"runs_dir={tmp_path}", "--notebooks", str(nbs)]
    assert cli(*args).returncode == 0
    out = tmp_path / "tiny" / "notebooks"
    good = (out / "01_x.ipynb").read_bytes()
    _notebook(nbs / "01_x.ipynb", "from hsr_lib.runs import LockHeld\nraise LockHeld('prune/x is being computed by pid 1')")
    proc = cli(*args)
    assert proc.returncode == 3 and "LockHeld" in proc.stderr
    assert (out / "01_x.ipynb").read_bytes() == good and (out / "01_x.failed.ipynb").is_file()
    assert read_json(tmp_path / "tiny" / "manifest.json")["notebooks"]["01_x"]["status"] == "ok"  # as it was


# ------------------------------------------------------------------ one writer per key


def test_a_second_writer_of_a_key_is_refused_naming_the_holder(tmp_path):
    run = Run.open(load_params(TINY, {"runs_dir": str(tmp_path)}))
    spec = Spec("prune", "p", {"x": 1})
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from hsr_lib.params import load_params
        from hsr_lib.runs import Run, Spec
        run = Run(load_params({str(TINY)!r}, {{"runs_dir": {str(tmp_path)!r}}}), {str(run.dir)!r})
        with run.lock(Spec("prune", "p", {{"x": 1}})):
            print("holding", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(LockHeld, match=rf"prune/{spec.key} is being computed by pid {holder.pid} on "):
            with run.step(spec):
                pass
        assert not run.is_done(spec)
        with run.step(Spec("prune", "p", {"x": 2})):  # another key proceeds
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with run.step(spec):  # the dead holder's lock is taken over
        pass
    assert run.is_done(spec)


def test_a_stale_lock_is_taken_over_with_a_message(tmp_path, capsys):
    run = Run.open(load_params(TINY, {"runs_dir": str(tmp_path)}))
    spec = Spec("prune", "p", {"x": 1})
    (run.dir / "prune").mkdir(parents=True)
    (run.dir / "prune" / f".{spec.key}.holder.json").write_text('{"pid": 999999, "host": "h", "since": "then"}')
    with run.step(spec):
        pass
    assert "taking over the lock of pid 999999 on h (since then)" in capsys.readouterr().out


# ------------------------------------------------------------------ movable


def test_a_copied_run_resumes_with_nothing_recomputed(lib_run, tmp_path):
    P, src = lib_run
    dst = tmp_path / "elsewhere" / "lib"
    shutil.copytree(src, dst)
    before = markers(dst)
    moved = Run(P.replace({"runs_dir": str(dst.parent)}), dst)
    res = steps.evaluate.run(moved, progress=False)
    assert markers(dst) == before
    sets = steps.data.load(moved)
    assert all(Path(s.image).is_relative_to(dst) and Path(s.image).is_file() for s in sets.load("ships_safety"))
    assert res.dir.parent.parent == dst


# ------------------------------------------------------------------ containment and params


@pytest.mark.parametrize("name", ["../../x", "/abs/x", "", "a/b", ".."])
def test_run_name_is_a_plain_name(name):
    with pytest.raises(ParamsError, match="run_name: must be a plain folder name"):
        load_params(TINY, {"run_name": name})


def _vlguard_with(tmp_path, image: str):
    from test_runs import _tiny_vlguard

    vg = tmp_path / "vg"
    _tiny_vlguard(vg)
    recs = json.loads((vg / "train.json").read_text())
    recs[1]["image"] = image
    (vg / "train.json").write_text(json.dumps(recs))
    return vg


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
def test_image_paths_must_stay_inside_their_root(tmp_path, kind):
    outside = tmp_path / "secret.png"
    from PIL import Image

    Image.new("RGB", (4, 4)).save(outside)
    image = {"absolute": str(outside), "dotdot": "../secret.png", "symlink": "img/link.png"}[kind]
    vg = _vlguard_with(tmp_path, image)
    if kind == "symlink":
        (vg / "img" / "link.png").symlink_to(outside)
    P = load_params(TINY, {"runs_dir": str(tmp_path / "runs"), "data.vlguard_root": str(vg), "data.n_ships": "all",
                           "data.n_scores": "all"})
    with pytest.raises(InputError, match=r"record id 'u1'.*resolves outside its root.*data.allow_outside_root"):
        check(P, {"data"})
    check(P.replace({"data.allow_outside_root": True}), {"data"})
    assert not (tmp_path / "runs").exists()


def test_artifacts_honour_the_umask(run_copy):
    res = steps.prune.load(run_copy())
    for p in (res.mask_path, res.dir / "summary.json", res.dir / "_step.json"):
        assert p.stat().st_mode & 0o777 == 0o666 & ~UMASK, p


def write(tmp_path, text: str | bytes, name="p.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_params_file_errors_are_one_line(tmp_path):
    cases = {
        "": "the params file is empty",
        "# only a comment\n": "the params file is empty",
        "pruning:\n  method: wanda\npruning:\n  sparsity: 0.3\n": "found the key 'pruning' twice (first on line 1)",
        b"run_name: caf\xe9\n": "not a UTF-8 text file",
    }
    for text, needle in cases.items():
        path = write(tmp_path, text)
        with pytest.raises(ParamsError) as err:
            load_params(path)
        assert needle in str(err.value) and str(path) in str(err.value), err.value
        assert needle in one_line(cli("params", str(path)))


def test_path_keys_are_relative_to_the_file_that_sets_them(tmp_path, monkeypatch):
    (tmp_path / "conf" / "sub").mkdir(parents=True)
    write(tmp_path / "conf", "runs_dir: out\neval:\n  data_roots:\n    mmbench: ../bench\n", "base.yaml")
    leaf = write(tmp_path / "conf" / "sub", "extends: ../base.yaml\ndata:\n  vlguard_root: vg\n", "leaf.yaml")
    monkeypatch.chdir(ROOT)
    P = load_params(leaf, ["eval.llm_judge_path=judge"])
    assert P.runs_dir == str(tmp_path / "conf" / "out")
    assert P.eval.data_roots["mmbench"] == str(tmp_path / "bench")
    assert P.data.vlguard_root == str(tmp_path / "conf" / "sub" / "vg")
    assert P.eval.llm_judge_path == str(ROOT / "judge")  # overrides: the current directory


def test_preflight_names_every_bad_input_before_any_notebook(tmp_path, lib_run, capsys):
    _, src = lib_run
    before = snapshot(src)
    (tmp_path / "a-file").write_text("x")
    from test_runs import _tiny_vlguard

    vg = tmp_path / "vg"
    _tiny_vlguard(vg)
    cases = [
        (["-p", f"runs_dir={tmp_path / 'a-file'}"], "runs_dir"),
        (["-p", f"model.name={tmp_path / 'no-such-model'}"], "model.name"),
        (["-p", "model.name=tiny:nope"], "unknown tiny model"),
        (["-p", "model.name=toy:nope"], "unknown toy model"),
        (["-p", f"data.vlguard_root={tmp_path / 'nope'}"], "data.vlguard_root"),
        (["-p", f"data.vlguard_root={vg}", "-p", f"data.image_root={tmp_path / 'nope'}"], "data.image_root"),
        (["-p", f"data.vlguard_root={vg}", "-p", "data.n_ships=1000"],
         "data.n_ships = 1000 but the safety split has only 2 records"),
        (["-p", "eval.data_roots={}"], "eval.data_roots.safebench is not set"),
        (["-p", "eval.judges=[llm]", "-p", f"eval.llm_judge_path={tmp_path}"], "eval.llm_judge_path"),
        (["-p", "pruning.sparsity=1.5"], "pruning.sparsity"),
    ]
    for extra, needle in cases:  # in process: the same code path as the command, without its start-up
        code = main(["run", str(TINY), "-p", f"runs_dir={tmp_path / 'runs'}", *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and needle in err, (extra, err)
    assert needle in one_line(cli("run", str(TINY), "-p", f"runs_dir={tmp_path / 'runs'}", *extra))
    assert not (tmp_path / "runs").exists()
    # a run that stops before evaluation does not need evaluation data
    P = load_params(TINY, {"runs_dir": str(tmp_path / "runs"), "eval.data_roots": {}})
    check(P, {"data", "ships", "scores", "prune", "realign"})
    with pytest.raises(InputError, match="eval.data_roots"):
        check(P, {"evaluate"})
    assert snapshot(src) == before


def test_image_root_defaults_from_the_vlguard_root(tmp_path):
    from test_runs import _tiny_vlguard

    vg = tmp_path / "vg"
    _tiny_vlguard(vg)
    (vg / "train").mkdir()
    shutil.move(str(vg / "img"), str(vg / "train" / "img"))
    P = load_params(TINY, {"runs_dir": str(tmp_path / "runs"), "data.vlguard_root": str(vg), "data.n_ships": "all",
                           "data.n_scores": "all"})
    check(P, {"data"})  # images found under <vlguard_root>/train
    sets = steps.data.run(Run.open(P), progress=False)
    assert all(Path(s.image).is_relative_to(vg / "train") for s in sets.load("safety"))


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    import hsr_lib.cli as C

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(C, "run_pipeline", interrupted)
    assert main(["run", str(TINY)]) == 130
    assert capsys.readouterr().err.strip() == "hsr: interrupted"


# ------------------------------------------------------------------ kill -9 and resume


KILLER = """
import os, signal, sys
from hsr_lib.params import load_params
from hsr_lib.runs import Run
from hsr_lib.steps import ships as S

real = S.ships_engine

def engine(lm, prompts, cfg, batch, done, on_layer, progress):
    def save(layer, scores):
        on_layer(layer, scores)
        if layer == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # killed mid-step, after two layers were saved
    return real(lm, prompts, cfg, batch, done, save, progress)

S.ships_engine = engine
P = load_params(sys.argv[1], {"runs_dir": sys.argv[2], "data.n_ships": 4, "model.name": "tiny:qwen2_vl"})
S.run(Run.open(P), progress=False)
"""


def test_kill_9_mid_step_then_resume_gives_the_same_artifacts(tmp_path, capsys):
    proc = subprocess.run([sys.executable, "-c", KILLER, str(TINY), str(tmp_path / "killed")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    over = {"data.n_ships": 4, "model.name": "tiny:qwen2_vl"}
    killed = Run.open(load_params(TINY, {"runs_dir": str(tmp_path / "killed"), **over}))
    spec = steps.ships.spec(killed.params)
    assert not killed.is_done(spec) and len(list((killed.staging(spec) / "layers").iterdir())) == 2
    resumed = steps.ships.run(killed, progress=True)
    out = capsys.readouterr().out
    assert "resuming: 2 of 4 layers already scored" in out and "taking over the lock" in out
    clean = steps.ships.run(Run.open(load_params(TINY, {"runs_dir": str(tmp_path / "clean"), **over})),
                            progress=False)
    a, b = snapshot(resumed.dir), snapshot(clean.dir)
    a.pop("_step.json"), b.pop("_step.json")
    assert a == b
    ra, rb = read_json(resumed.dir / "_step.json"), read_json(clean.dir / "_step.json")
    assert ra["files"].keys() == rb["files"].keys()
    assert all(ra["files"][k][2] == rb["files"][k][2] for k in ra["files"])
