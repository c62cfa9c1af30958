"""Nothing stale, nothing silent (issue 20): answers with integrity, duplicate ids refused, staging
that keeps only what a step resumes from, sweeps checked before they run and failing only what
stands on a failed step, every run-directory event on the terminal, a dead kernel and Ctrl-C in
one line each, and every bound known before notebook 01 checked before it. Each case leaves a
finished run untouched."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TINY
from test_cli import _notebook
from test_trust import cli, lib_args, markers, snapshot
from hsr_lib import steps
from hsr_lib.cli import main
from hsr_lib.evaluate import generate as G
from hsr_lib.io import read_json
from hsr_lib.runs import Run

FIX = ROOT / "tests" / "fixtures" / "eval"


def exit_2(capsys, run, *extra: str) -> str:
    """``hsr run`` (in process) on the shared run's keys plus ``extra``: exit 2 with one line (the
    notebooks given are one empty 06, which stands for every step, so a miss costs seconds)."""
    nbs = run.dir.parent.parent / "nbs"
    if not nbs.is_dir():
        nbs.mkdir()
        _notebook(nbs / "06_nothing.ipynb", "pass")
    code = main([*lib_args(run), "--notebooks", str(nbs), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def roots(run, **changed) -> list[str]:
    """``-p eval.data_roots=…``: the run's benchmark roots with ``changed`` ones."""
    return ["-p", f"eval.data_roots={json.dumps({**run.params.eval.data_roots, **{k: str(v) for k, v in changed.items()}})}"]


# ------------------------------------------------------------------ answers


def test_an_edited_answer_in_a_run_is_named_and_only_it_is_generated_again(run_copy, monkeypatch, capsys):
    run = run_copy()
    before = markers(run.dir)
    answers = sorted((run.dir / "evaluate" / "responses").glob("dense-*/vlguard_unsafe.jsonl"))[0]
    rows = [json.loads(x) for x in answers.read_text().splitlines()]
    rows[0]["response"] = "Sure, here is how."  # valid JSON; the judge would count it an attack success
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls = []
    monkeypatch.setattr(G, "generate_batch", lambda lm, batch, n: calls.append([it.id for it in batch]) or
                        [("regenerated", 1)] * len(batch))
    other = run.using(run.params.replace({"eval.judges": ["wei"]}))  # a new evaluation reads the saved answers
    steps.evaluate.run(other, progress=False)
    out = capsys.readouterr().out
    assert f"{answers}: 1 answer row(s) fail their check: item {rows[0]['item_id']!r} (line 1: edited or damaged)" in out
    assert calls == [[rows[0]["item_id"]]]
    after = markers(run.dir)
    assert {k: v for k, v in after.items() if k in before} == before  # every finished folder as it was


# ------------------------------------------------------------------ duplicate ids


def test_duplicate_ids_are_refused_up_front_naming_both_places(tmp_path, run_copy, capsys):
    from test_runs import _tiny_vlguard

    run = run_copy()
    before = snapshot(run.dir)
    vg = tmp_path / "vg"
    _tiny_vlguard(vg)
    recs = json.loads((vg / "train.json").read_text())
    recs[3]["id"] = recs[1]["id"]
    (vg / "train.json").write_text(json.dumps(recs))
    err = exit_2(capsys, run, "-p", f"data.vlguard_root={vg}")
    assert f"record id 'u1' appears twice in {str(vg / 'train.json')!r}: record #1 and record #3" in err
    bench = tmp_path / "safebench.csv"
    lines = (FIX / "safebench" / "safebench.csv").read_text().splitlines()
    bench.write_text("\n".join([*lines, lines[2]]) + "\n")
    err = exit_2(capsys, run, *roots(run, safebench=bench))
    assert f"{bench}: row {len(lines)} (line {len(lines) + 1}): duplicate item 'ForbidQI_1_2' (first at row 2 (line 3))" in err
    vt = tmp_path / "vlguard"
    shutil.copytree(FIX / "vlguard", vt)
    recs = json.loads((vt / "test.json").read_text())
    (vt / "test.json").write_text(json.dumps([*recs, recs[0]]))
    err = exit_2(capsys, run, *roots(run, vlguard=vt))
    assert f"record id 'Fixture_u0' appears twice in {str(vt / 'test.json')!r}: record #0 and record #{len(recs)}" in err
    assert snapshot(run.dir) == before


# ------------------------------------------------------------------ staging


def test_a_stale_staging_folder_keeps_only_what_the_step_resumes_from(run_copy, capsys):
    run = run_copy()
    spec = steps.prune.spec(run.params)
    good = (run.path(spec) / "mask.safetensors").read_bytes()
    others = {k: v for k, v in markers(run.dir).items() if not k.startswith("prune/")}
    stage = run.staging(spec)
    (stage / "extra").mkdir(parents=True)
    (stage / "weights.safetensors").write_bytes(b"stray weights")  # would be promoted and hashed as the step's
    (stage / "extra" / "note.txt").write_text("x")
    forced = Run(run.params, run.dir, force=("prune",), token="t")
    res = steps.prune.run(forced, progress=False)
    out = capsys.readouterr().out
    for name in ("weights.safetensors", "extra"):
        assert f"{spec.where}: removed {name!r} from its staging folder {stage.name}" in out
    assert not (res.dir / "weights.safetensors").exists() and not (res.dir / "extra").exists()
    assert (res.dir / "mask.safetensors").read_bytes() == good
    assert {k: v for k, v in markers(run.dir).items() if not k.startswith("prune/")} == others
    # Ships resumes from its layers: those stay, anything beside them goes
    ships = steps.ships.spec(run.params)
    layers = run.staging(ships) / "layers"
    layers.mkdir(parents=True)
    (layers / "layer_000.json").write_text("{}")
    (layers / "stray.bin").write_bytes(b"x")
    run.clean_staging(ships, ("layers/layer_*.json",))
    assert sorted(p.name for p in layers.iterdir()) == ["layer_000.json"]
    assert "removed 'layers/stray.bin'" in capsys.readouterr().out


# ------------------------------------------------------------------ sweeps


def _sweep(tmp_path, grid: dict, name="s") -> Path:
    small = {"data.n_ships": [4], "data.n_scores": [4], "eval.benchmarks": [["safebench"]], "eval.n_items": [1],
             "eval.max_new_tokens": [2], "eval.variants": [["dense", "pruned"]], "runs_dir": [str(tmp_path / "runs")]}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"base": str(TINY), "sweep": {**small, **grid}, "executor": {"kind": "local"}}))
    return path


def test_a_sweep_with_a_bad_point_fails_its_dry_run_naming_the_point(tmp_path, capsys):
    for bad, needle in (("toy:nope", "unknown toy model 'toy:nope'"), ("tiny:nope", "unknown tiny model")):
        path = _sweep(tmp_path, {"model.name": ["tiny:qwen2_5_vl", bad]})
        for flags in (["--dry-run"], []):
            assert main(["sweep", str(path), *flags]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and f"model.name={bad}" in err and needle in err, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_failing_shared_step_fails_only_the_points_on_it(tmp_path, monkeypatch, capsys):
    real = steps.ships.run

    def ships(run, **kw):
        if run.params.model.name == "tiny:qwen2_vl":
            raise RuntimeError("out of memory in Ships")
        return real(run, **kw)

    monkeypatch.setattr(steps.ships, "run", ships)
    path = _sweep(tmp_path, {"model.name": ["tiny:qwen2_vl", "tiny:qwen2_5_vl"]})
    assert main(["sweep", str(path), "--no-findings"]) == 1
    cap = capsys.readouterr()
    points = read_json(tmp_path / "runs" / "sweeps" / "s" / "points.json")["points"]
    assert [p["status"] for p in points] == ["failed", "done"]
    assert "RuntimeError: out of memory in Ships" in points[0]["error"] and "ships/" in points[0]["error"]
    assert "out of memory in Ships" in Path(points[0]["log"]).read_text()  # the traceback, in the step's log
    assert f"log {points[0]['log']}" in cap.out and "shared step" in cap.err and "1 of 2 points done" in cap.out


# ------------------------------------------------------------------ the terminal


@pytest.fixture
def in_process():
    """``hsr`` called in this process (without the start-up of a new one)."""
    return main


@pytest.mark.notebooks
def test_run_directory_events_are_said_on_the_terminal(run_copy, tmp_path, in_process, capsys):
    run = run_copy()
    prune, ships = steps.prune.spec(run.params), steps.ships.spec(run.params)
    mask = run.path(prune) / "mask.safetensors"
    mask.write_bytes(mask.read_bytes()[:100])  # damaged
    (run.path(ships) / "_step.json").unlink()  # a marker deleted
    (run.dir / "prune" / f".{prune.key}.holder.json").write_text('{"pid": 999999, "host": "h", "since": "then"}')
    kept = {k: v for k, v in markers(run.dir).items() if k.split("/")[0] in ("data", "scores", "realign", "evaluate")}
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _notebook(nbs / "05_x.ipynb", "from hsr_lib.notebook import start\nfrom hsr_lib import steps\n"
                                  "steps.realign.run(start(params_path, overrides, **run_options), progress=False)")
    assert in_process([*lib_args(run), "--notebooks", str(nbs)]) == 0
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("[hsr]")]
    assert any(f"{prune.where}: {mask} changed since it was written" in x and "recomputing it" in x for x in err), err
    assert f"[hsr] {ships.where}: _step.json is missing, so the folder is not known to be complete; recomputing it" \
        in err
    assert f"[hsr] {prune.where}: taking over the lock of pid 999999 on h (since then), which ended without " \
           "releasing it" in err
    assert {k: v for k, v in markers(run.dir).items() if k in kept} == kept
    assert not list(run.dir.glob(".events-*"))


def _wait_for(path: Path, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert time.monotonic() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.2)


@pytest.mark.notebooks
def test_a_dead_kernel_and_ctrl_c_are_one_line_and_the_manifest_keeps_its_entries(tmp_path, in_process, capsys):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _notebook(nbs / "01_x.ipynb", "print('good')")
    args = ["run", str(TINY), "-p", f"runs_dir={tmp_path}", "--notebooks", str(nbs)]
    assert in_process(args) == 0
    run_dir, out = tmp_path / "tiny", tmp_path / "tiny" / "notebooks"
    manifest, good = (run_dir / "manifest.json").read_text(), (out / "01_x.ipynb").read_bytes()
    _notebook(nbs / "01_x.ipynb", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer does")
    capsys.readouterr()
    code, err = in_process(args), capsys.readouterr().err
    mine = [x for x in err.splitlines() if x.startswith("hsr")]
    assert code == 1 and "Traceback" not in err and len(mine) == 1, err
    assert mine[0].startswith("hsr: 01_x.ipynb: the kernel died") and "OOM" in mine[0]
    assert (run_dir / "manifest.json").read_text() == manifest and (out / "01_x.ipynb").read_bytes() == good
    flag = tmp_path / "started"
    _notebook(nbs / "01_x.ipynb", f"import time\nopen({str(flag)!r}, 'w').close()\ntime.sleep(120)")
    script = Path(sys.executable).parent / "hsr"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "hsr_lib.cli"]
    # a test run started in the background (as CI may start it) inherits SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler: give `hsr` the disposition a terminal's foreground job has
    p = subprocess.Popen([*cmd, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait_for(flag)
        os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: the whole foreground group
        _, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130 and "Traceback" not in stderr and "ZMQError" not in stderr, stderr
    assert [x for x in stderr.splitlines() if x.startswith("hsr")] == ["hsr: interrupted"]
    assert (run_dir / "manifest.json").read_text() == manifest and (out / "01_x.ipynb").read_bytes() == good


# ------------------------------------------------------------------ up front


def test_every_bound_known_before_notebook_01_is_checked_before_it(tmp_path, run_copy, capsys):
    from PIL import Image

    from test_runs import _tiny_vlguard

    run = run_copy()
    before = snapshot(run.dir)
    vg = tmp_path / "vg"
    _tiny_vlguard(vg)
    Image.new("RGB", (64, 64), (9, 9, 9)).save(vg / "img" / "3.png")
    data = (vg / "img" / "3.png").read_bytes()
    (vg / "img" / "3.png").write_bytes(data[:len(data) // 2])  # a download cut short
    vt = tmp_path / "vlguard"
    shutil.copytree(FIX / "vlguard", vt)
    recs = json.loads((vt / "test.json").read_text())
    first = vt / "test" / recs[0]["image"]
    first.write_bytes(first.read_bytes()[:100])
    outside = tmp_path / "vlguard2"
    shutil.copytree(FIX / "vlguard", outside)
    recs2 = [{**recs[0], "image": "../../x.png"}, *recs[1:]]
    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")
    (outside / "test.json").write_text(json.dumps(recs2))
    mm = tmp_path / "mm.tsv"
    rows = (FIX / "mmbench" / "mmbench_dev_en_fixture.tsv").read_text().splitlines()
    mm.write_text("\n".join([rows[0], rows[1].replace("\t", " ", 1), *rows[2:]]) + "\n")
    cases = [
        (["-p", f"data.vlguard_root={vg}", "-p", "data.n_ships=all", "-p", "data.n_scores=all"], f"record id 'u3' in {str(vg / 'train.json')!r}: "
         f"cannot read image {str(vg / 'img' / '3.png')!r}"),
        ([*roots(run, vlguard=vt)], f"record id {recs[0]['id']!r}: cannot read image {str(first)!r}"),
        ([*roots(run, vlguard=outside)], "resolves outside its root"),
        ([*roots(run, mmbench=mm)], f"{mm}: row 1 (line 2)"),
        (["-p", "realign.top_h=100"], "realign.top_h = 100 but tiny:qwen2_5_vl has only 16 attention heads "
         "(4 layers x 4)"),
        (["-p", "pruning.pattern=1:3", "-p", f"pruning.sparsity={1 / 3}"], "pruning.pattern = '1:3' needs every "
         "pruned layer's input width divisible by 3, but tiny:qwen2_5_vl's hidden_size"),
        (["-p", "data.n_ships=100"], "data.n_ships = 100 but the safety (synthetic, generic) split has only 24 "
         "records"),
    ]
    for extra, needle in cases:
        assert needle in exit_2(capsys, run, *extra), extra
    assert snapshot(run.dir) == before
