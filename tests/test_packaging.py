"""The install files agree with each other, the top level is the one the design fixes, and the
repository explains itself: nothing in it points outside it."""

import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _name(req: str) -> str:
    return req.split(";")[0].strip().split("=")[0].split(">")[0].split("<")[0].split("[")[0].strip().lower()


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_install_files_agree_pyproject_requirements_in_lock_and_environment():
    from packaging.requirements import Requirement

    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = py["dependencies"] + py["optional-dependencies"]["test"]
    req_in = [x for x in (ROOT / "requirements.in").read_text().splitlines() if x and not x.startswith("#")]
    assert req_in == [r for r in wanted if _name(r) != "torch"]  # the lock's input is pyproject, torch aside
    lock = _lock()
    for r in map(Requirement, req_in):  # every range pinned, at a version inside it
        name = r.name.lower().replace("_", "-")
        assert name in lock and r.specifier.contains(lock[name], prereleases=True), (r, lock.get(name))
    assert not any(n == "torch" or n.startswith("nvidia") or n == "torchvision" for n in lock)
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pip == ["torch==2.13.0", "-r requirements.lock", "-e ."]
    make = (ROOT / "Makefile").read_text()
    assert "torch==2.13.0" in make and "-r requirements.lock" in make and "--no-deps -e ." in make
    assert not any("torchvision" in r for r in py["dependencies"])


def test_top_level_layout():
    for name in ("notebooks", "hsr_lib", "params", "tests", "docs", "environment.yml", "README.md", "pyproject.toml",
                 ".ci/run", "hsr_lib/steps"):
        assert (ROOT / name).exists(), name
    assert "torch==2.13.0" in (ROOT / "Makefile").read_text()
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make tiny" in readme and "make test" in readme


def test_console_script_declared():
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert py["scripts"]["hsr"] == "hsr_lib.cli:main"


def test_nothing_points_outside_the_repository():
    """A user's clone has no ../shared and no design notes beside it: the docs/ folder is the reference."""
    import re

    bad = []
    for path in [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("notebooks/*.ipynb"),
                 *ROOT.glob("hsr_lib/**/*.py"), *ROOT.glob("params/**/*.yaml")]:
        text = path.read_text()
        if "../shared" in text or re.search(r"DESIGN(\.md)? ?§", text):
            bad.append(str(path.relative_to(ROOT)))
    assert bad == []
    for link in re.findall(r"\]\((docs/[^)#]+)", (ROOT / "README.md").read_text()):
        assert (ROOT / link).is_file(), link


def test_no_merge_conflict_markers_left():
    """A merge that left ``<<<<<<<`` / ``>>>>>>>`` lines in a tracked text file is caught here."""
    import subprocess

    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        import pytest

        pytest.skip("not a git checkout")
    bad = []
    for name in tracked:
        path = ROOT / name
        if path.suffix not in {".py", ".md", ".yaml", ".yml", ".ipynb", ".toml", ".txt", ".cfg", ".in", ".lock"} \
                and path.name not in {"Makefile", "run"}:
            continue
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if line.startswith(("<<<<<<< ", ">>>>>>> ")) or line == "<<<<<<<":
                bad.append(f"{name}:{i}")
    assert not bad, f"merge conflict markers in {bad}"
