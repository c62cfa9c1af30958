"""``hsr book``: a finished run's notebooks and the exercises as a static site that loads nothing from
the network, opened in headless Chromium (console errors, images, links, requests)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nbformat
import pytest

from hsr_lib.book import BookError, build_book, offline_markdown, prerender_math
from hsr_lib.site_check import check_site, find_chromium

CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium; "
                                    ".ci/run installs it)")


def test_book_math_is_rendered_at_build_time_and_web_images_become_links():
    store: dict[str, str] = {}
    text = prerender_math("R = $P \\cap F$ and $$x^2$$ but `$HOME` and ```\n$a$\n``` stay; costs 5$", store)
    assert "`$HOME`" in text and "```\n$a$\n```" in text and "5$" in text
    assert len(store) == 2 and all(v.startswith("<math") for v in store.values())
    assert 'display="block"' in store[re.search(r"hsrmath\dx", text.split("and", 1)[1]).group(0)]
    assert "http://www.w3.org" not in "".join(store.values())
    md = offline_markdown("[![Open In Colab](https://colab.example/badge.svg)](https://colab.example/nb) "
                          "![plot](https://x.example/p.png) ![local](fig.png)")
    assert md == "[Open In Colab](https://colab.example/nb) [plot](https://x.example/p.png) ![local](fig.png)"


def test_book_refuses_what_is_not_a_finished_run(tmp_path):
    from hsr_lib.cli import main

    with pytest.raises(BookError, match="no manifest.json"):
        build_book(tmp_path)
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(BookError, match="no executed notebooks"):
        build_book(tmp_path)
    assert main(["book", str(tmp_path / "nowhere")]) == 2


@pytest.fixture(scope="module")
def site(tiny_run, tmp_path_factory):
    """The site of the tiny run (every notebook 01–06 executed), with a stand-in sweep folder whose
    notebook 07 is a copy of an executed notebook."""
    run_dir, _ = tiny_run
    sweep = tmp_path_factory.mktemp("sweep")
    shutil.copy(run_dir / "notebooks" / "06_evaluate.ipynb", sweep / "07_findings.ipynb")
    out = tmp_path_factory.mktemp("site")
    build_book(run_dir, out, sweep_dir=sweep)
    return out


@pytest.mark.notebooks
def test_book_pages_index_and_nothing_from_the_network(site, tiny_run):
    pages = sorted(p.relative_to(site).as_posix() for p in site.rglob("*.html"))
    assert pages == ["01_data.html", "02_ships.html", "03_scores.html", "04_prune.html", "05_realign.html",
                     "06_evaluate.html", "exercises/01_head_ablation.html", "exercises/02_wanda.html",
                     "exercises/03_set_operation.html", "exercises/04_metrics.html", "exercises/05_sweep.html",
                     "findings.html", "index.html"]
    index = (site / "index.html").read_text()
    run_dir, _ = tiny_run
    for needle in ("tiny:", "Results", "prune/wanda", "06_evaluate", "wall (s)", "exercises/03_set_operation.html",
                   "findings.html"):
        assert needle in index, needle
    for page in site.rglob("*.html"):
        text = page.read_text()
        assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=[\"']?(https?:)?//", text), page.name
        assert "require.js" not in text and "mathjax" not in text.lower(), page.name
        assert "### BEGIN SOLUTION" not in text
    assert "<math" in (site / "03_scores.html").read_text()  # the formulas, pre-rendered
    assert re.search(r'<img[^>]+src="data:image/png;base64,', (site / "02_ships.html").read_text())  # figures embedded
    assert "YOUR CODE HERE" in (site / "exercises" / "03_set_operation.html").read_text()


@pytest.mark.notebooks
@needs_chromium
def test_book_opens_in_headless_chromium(site, tmp_path):
    report = check_site(site, screenshot=tmp_path / "index.png", binary=CHROMIUM)
    assert not report["problems"], "\n".join(report["problems"])
    assert len(report["pages"]) == 13  # the index and every page reached through the links
    assert sum(len(p["images"]) for p in report["pages"].values()) >= 5
    assert all(len(p["links"]) > 10 for p in report["pages"].values())  # the navigation bar on every page
    assert report["pages"]["03_scores.html"]["maths"] > 0
    png = (tmp_path / "index.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.slow
@needs_chromium
def test_site_check_reports_what_a_reader_would_hit(tmp_path):
    (tmp_path / "index.html").write_text(
        '<!DOCTYPE html><html><head><title>t</title></head><body><a href="#nowhere">a</a><a href="b.html">b</a>'
        '<script>console.error("boom")</script></body></html>')
    (tmp_path / "b.html").write_text('<html><body><img src="https://example.invalid/x.png">'
                                     '<img src="data:image/png;base64,AAAA"><a href="c.html">c</a></body></html>')
    problems = "\n".join(check_site(tmp_path, binary=CHROMIUM)["problems"])
    for needle in ("index.html: console: boom", "index.html: link to a missing anchor #nowhere",
                   "b.html: request leaves the site: https://example.invalid/x.png",
                   "b.html: image does not decode: https://example.invalid", "b.html: image does not decode: data:",
                   "b.html: link to a missing page"):
        assert needle in problems, (needle, problems)
