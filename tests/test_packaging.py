"""The install files agree with each other, the top level is the one the design fixes, and the
repository explains itself: nothing in it points outside it."""

import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _name(req: str) -> str:
    return req.split(";")[0].strip().split("=")[0].split(">")[0].split("<")[0].split("[")[0].strip().lower()


def test_environment_yml_pip_section_matches_pyproject():
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    wanted = {_name(r): r for r in py["dependencies"] + py["optional-dependencies"]["test"]}
    listed = {_name(r): r for r in pip if not r.startswith("-e")}
    assert set(listed) == set(wanted)
    for name, req in wanted.items():
        if name != "torch":  # environment.yml pins the tested build; pyproject leaves Colab's alone
            assert listed[name].replace(" ", "") == req.replace(" ", ""), name
    assert listed["torch"] == "torch==2.13.0" and "-e ." in pip
    assert not any("torchvision" in r for r in [*pip, *py["dependencies"]])


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
