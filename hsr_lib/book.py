"""``hsr book``: a finished run's executed notebooks (and a sweep's notebook 07) plus the exercises'
student version as a static site, rendered with nbconvert (docs/course.md).

The site loads nothing from the network: the page template is nbconvert's ``lab`` template without
require.js, MathJax, mermaid or widget scripts; formulas are rendered at build time into MathML (which
the browser draws itself); figures are embedded in the pages; images that a notebook pulls from the web
(the Colab badge) become plain links. An index page shows the run's model, params, step keys, wall
times and results table, and every page has the same navigation bar.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nbformat

SITE_CSS = """
body.hsr-index { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #222; }
.hsr-nav { position: sticky; top: 0; z-index: 10; background: #1f3b57; color: #fff; padding: 6px 14px;
  font: 14px/1.6 system-ui, -apple-system, "Segoe UI", sans-serif; display: flex; flex-wrap: wrap; gap: 4px 14px; }
.hsr-nav a { color: #dbe9f7; text-decoration: none; }
.hsr-nav a.here { color: #fff; font-weight: 600; border-bottom: 2px solid #f0b429; }
.hsr-nav .hsr-sep { color: #7f9bb5; }
.hsr-pager { font: 14px system-ui, sans-serif; margin: 18px 24px; display: flex; justify-content: space-between; }
.hsr-main { max-width: 1100px; margin: 0 auto; padding: 10px 24px 40px; }
.hsr-main table { border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; }
.hsr-main th, .hsr-main td { border: 1px solid #ccd; padding: 3px 8px; text-align: right; }
.hsr-main th { background: #eef2f7; }
.hsr-main td.l, .hsr-main th.l { text-align: left; }
.hsr-main pre { background: #f6f8fa; padding: 10px; overflow-x: auto; font-size: 12px; }
.hsr-cards { display: flex; gap: 12px; flex-wrap: wrap; }
.hsr-card { border: 1px solid #ccd; border-radius: 6px; padding: 8px 14px; min-width: 150px; }
.hsr-card b { display: block; font-size: 12px; color: #556; font-weight: 500; }
math { font-size: 1.05em; }
"""

TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{% block jupyter_widgets %}{% endblock jupyter_widgets %}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{% block extra_css %}<style type="text/css">{{ resources.hsr_css }}</style>{% endblock extra_css %}
{% block notebook_css %}<link rel="stylesheet" href="{{ resources.hsr_prefix }}static/notebook.css">{% endblock notebook_css %}
{%- block body_header -%}
{{ super() }}
{{ resources.hsr_nav }}
{%- endblock body_header -%}
{% block body_footer %}
{{ resources.hsr_pager }}
{{ super() }}
{% endblock body_footer %}
"""

_FENCE = re.compile(r"(```.*?```|`[^`\n]*`)", re.S)
_DISPLAY = re.compile(r"\$\$(.+?)\$\$", re.S)
_INLINE = re.compile(r"(?<![\\$])\$(?!\s)([^$\n]+?)(?<![\s\\])\$(?!\d)")
_WEB_IMAGE = re.compile(r"!\[([^\]]*)\]\((https?://[^)]+)\)")
_WEB_IMG_TAG = re.compile(r"<img[^>]+src=[\"']https?://[^>]*>", re.I)
_XMLNS = ' xmlns="http://www.w3.org/1998/Math/MathML"'


class BookError(ValueError):
    """A run directory or sweep folder the site cannot be built from (the message names it)."""


@dataclass
class Page:
    """One page of the site: its file (relative to the site root), its title and its source notebook."""

    href: str
    title: str
    label: str
    section: str
    notebook: Path | None = None


def to_mathml(tex: str, display: bool) -> str:
    """MathML for one formula (drawn by the browser itself); the TeX as code when it does not convert."""
    import latex2mathml.converter

    try:
        out = latex2mathml.converter.convert(tex.strip(), display="block" if display else "inline")
    except Exception:  # noqa: BLE001 - a formula the converter cannot read stays readable as TeX
        return f"<code>{html.escape(tex)}</code>"
    # U+29F5 (reverse solidus operator) is missing from common fonts; U+2216 (set minus) is the same sign
    return out.replace(_XMLNS, "").replace("&#x029F5;", "&#x02216;")


def prerender_math(source: str, store: dict[str, str]) -> str:
    """Markdown with every ``$…$`` / ``$$…$$`` outside code replaced by a token; ``store`` maps token → MathML."""

    def sub(text: str) -> str:
        def put(display: bool):
            def f(m: re.Match) -> str:
                token = f"hsrmath{len(store)}x"
                store[token] = to_mathml(m.group(1), display)
                return token
            return f
        text = _DISPLAY.sub(put(True), text)
        return _INLINE.sub(put(False), text)

    parts = _FENCE.split(source)
    return "".join(p if i % 2 else sub(p) for i, p in enumerate(parts))


def offline_markdown(source: str) -> str:
    """Images from the web (badges) become plain links: the site loads nothing from the network."""
    source = re.sub(r"\[!\[([^\]]*)\]\((https?://[^)]+)\)\]\(([^)]+)\)", r"[\1](\3)", source)
    source = _WEB_IMAGE.sub(r"[\1](\2)", source)
    return _WEB_IMG_TAG.sub("", source)


WIDGET = "application/vnd.jupyter.widget-view+json"


def _clean(nb) -> tuple[object, dict[str, str]]:
    """The notebook made fit for an offline page: math tokens, web images as links, no widget views."""
    store: dict[str, str] = {}
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            cell.source = prerender_math(offline_markdown(cell.source), store)
        elif cell.cell_type == "code":
            for out in cell.get("outputs", []):
                data = out.get("data")
                if data and WIDGET in data:
                    data.pop(WIDGET)
                    if not data:
                        data["text/plain"] = ""
    return nb, store


def _exporter():
    import jinja2
    from nbconvert import HTMLExporter

    exp = HTMLExporter(template_name="lab", extra_loaders=[jinja2.DictLoader({"hsr_book.html.j2": TEMPLATE})])
    exp.template_file = "hsr_book.html.j2"
    exp.exclude_anchor_links = False
    return exp


def nav_html(pages: list[Page], here: str, prefix: str) -> str:
    """The navigation bar: the index, then every page by section."""
    out = [f'<nav class="hsr-nav"><a href="{prefix}index.html"{" class=here" if here == "index.html" else ""}>'
           "hsr course site</a>"]
    section = None
    for p in pages:
        if p.section != section:
            section = p.section
            out.append(f'<span class="hsr-sep">│ {html.escape(section)}:</span>')
        cls = ' class="here"' if p.href == here else ""
        out.append(f'<a href="{prefix}{p.href}"{cls} title="{html.escape(p.title)}">{html.escape(p.label)}</a>')
    return "".join(out) + "</nav>"


def pager_html(pages: list[Page], i: int, prefix: str) -> str:
    prev = f'<a href="{prefix}{pages[i - 1].href}">← {html.escape(pages[i - 1].title)}</a>' if i > 0 else \
        f'<a href="{prefix}index.html">← index</a>'
    nxt = f'<a href="{prefix}{pages[i + 1].href}">{html.escape(pages[i + 1].title)} →</a>' if i + 1 < len(pages) \
        else f'<a href="{prefix}index.html">index →</a>'
    return f'<div class="hsr-pager">{prev}{nxt}</div>'


def render_page(path: Path, pages: list[Page], i: int, out: Path) -> None:
    """One notebook → one HTML page with the site's navigation."""
    page = pages[i]
    depth = page.href.count("/")
    prefix = "../" * depth
    nb, store = _clean(nbformat.read(path, as_version=4))
    nb.metadata["title"] = page.title
    body, _ = _exporter().from_notebook_node(nb, resources={"hsr_nav": nav_html(pages, page.href, prefix),
                                                            "hsr_prefix": prefix,
                                                            "hsr_pager": pager_html(pages, i, prefix),
                                                            "hsr_css": SITE_CSS})
    for token, mathml in store.items():
        body = body.replace(token, mathml)
    target = out / page.href
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(body, encoding="utf-8")


def write_notebook_css(out: Path) -> Path:
    """nbconvert's JupyterLab stylesheet (light theme), once for every page, instead of ~250 kB inlined in each."""
    exp = _exporter()
    parts = []
    for name in ("index.css", "theme-light.css"):
        found = next((Path(d) / "static" / name for d in exp.template_paths if (Path(d) / "static" / name).is_file()),
                     None)
        if found is None:
            raise BookError(f"nbconvert's lab template has no static/{name}; is nbconvert installed whole?")
        parts.append(found.read_text(encoding="utf-8"))
    target = out / "static" / "notebook.css"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(parts) + "\n* { -webkit-print-color-adjust: exact; }\n", encoding="utf-8")
    return target


def _title(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("# "):
                    return re.sub(r"\s+", " ", line[2:]).strip()
    return path.stem


def _table(rows: list[dict], left: tuple[str, ...] = ()) -> str:
    if not rows:
        return "<p>(none)</p>"
    cols = list(rows[0])
    head = "".join(f'<th class="{"l" if c in left else ""}">{html.escape(str(c))}</th>' for c in cols)
    body = "".join("<tr>" + "".join(f'<td class="{"l" if c in left else ""}">{html.escape(_fmt(r.get(c)))}</td>'
                                    for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if v != v else f"{v:.2f}"
    return str(v)


def results_rows(run_dir: Path, manifest: dict, judge: str | None = None) -> tuple[str | None, list[dict]]:
    """The last evaluation of the run as one row per variant: every benchmark's metrics (in %; ASR by the
    first judge), combined rows first, and the restored ratio (‱) from the paper-layout table."""
    import pandas as pd

    keys = [k for k in manifest.get("steps", {}) if k.startswith("evaluate/")]
    for key in reversed(keys):
        f = run_dir / key / "metrics.csv"
        if not f.is_file():
            continue
        m = pd.read_csv(f, keep_default_na=False, na_values={"value": [""]})
        judges = [j for j in m["judge"].unique() if j]
        first = judge if judge in judges else (judges[0] if judges else "")
        m = m[m["judge"].isin([first, ""])]
        m = m.assign(column=m["benchmark"] + " " + m["metric"].str.replace("_", "-"),
                     order=(m["benchmark"] != "combined").astype(int))
        cols = m.sort_values(["order", "benchmark", "metric"])["column"].drop_duplicates().tolist()
        wide = m.pivot_table(index="variant", columns="column", values="value", aggfunc="first", sort=False)
        wide = wide.reindex(index=list(dict.fromkeys(m["variant"])), columns=cols)
        table = run_dir / key / "results_table.csv"
        if table.is_file():
            rt = pd.read_csv(table).set_index("variant")
            if "restored_ratio_permyriad" in rt:
                wide["restored (‱)"] = rt["restored_ratio_permyriad"].reindex(wide.index)
        return f"{key} · ASR by the judge {first!r}" if first else key, wide.reset_index().to_dict(orient="records")
    return None, []


def index_html(run_dir: Path, manifest: dict, pages: list[Page], sweep_dir: Path | None) -> str:
    """The index page: the run's model, params, steps, notebook wall times, results, and the pages."""
    import yaml

    params_text = (run_dir / "params.yaml").read_text() if (run_dir / "params.yaml").is_file() else ""
    params = yaml.safe_load(params_text) or {}
    model = (params.get("model") or {}).get("name", "?")
    nbs = manifest.get("notebooks", {})
    steps = [{"step key": k, "wall (s)": v.get("wall_s"), "finished": v.get("finished", "")}
             for k, v in manifest.get("steps", {}).items()]
    nb_rows = [{"notebook": k, "status": v.get("status", ""), "wall (s)": v.get("wall_s")} for k, v in nbs.items()]
    eval_key, results = results_rows(run_dir, manifest)
    R, Pr = params.get("realign") or {}, params.get("pruning") or {}
    cards = [("model", model), ("fidelity", params.get("fidelity", manifest.get("fidelity", "?"))),
             ("pruning", f"{Pr.get('method', '?')} {Pr.get('sparsity', '?')} {Pr.get('pattern', '')}"),
             ("realign", f"top_h {R.get('top_h', '?')} · p {R.get('p', '?')} · q {R.get('q', '?')} · "
                         f"p_max {R.get('p_max', '?')}"),
             ("notebooks wall time", f"{sum(v.get('wall_s') or 0 for v in nbs.values()):.1f} s"),
             ("created", manifest.get("created", "?")), ("commit", str(manifest.get("git_commit", "?"))[:10])]
    sections: dict[str, list[Page]] = {}
    for p in pages:
        sections.setdefault(p.section, []).append(p)
    listing = "".join(f"<h3>{html.escape(s)}</h3><ul>" + "".join(
        f'<li><a href="{p.href}">{html.escape(p.title)}</a></li>' for p in ps) + "</ul>" for s, ps in sections.items())
    sweep_line = f"<p>Findings from the sweep <code>{html.escape(sweep_dir.name)}</code>.</p>" if sweep_dir else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>hsr · {html.escape(run_dir.name)}</title><style>{SITE_CSS}</style></head>
<body class="hsr-index">{nav_html(pages, "index.html", "")}
<main class="hsr-main">
<h1>Hierarchical Safety Realignment · run <code>{html.escape(run_dir.name)}</code></h1>
<p>The executed notebooks of one run of the pipeline, the exercises of the course (student version), and this
run's numbers, as a site that opens without Jupyter and loads nothing from the network.</p>
<div class="hsr-cards">{"".join(f"<div class=hsr-card><b>{html.escape(k)}</b>{html.escape(str(v))}</div>" for k, v in cards)}</div>
<h2>Results</h2>
<p>From <code>{html.escape(eval_key or "(no evaluation in this run)")}</code>; rates in %, one row per model variant.</p>
{_table(results, left=("variant",))}
{sweep_line}
<h2>Pages</h2>{listing}
<h2>Notebooks: wall times</h2>{_table(nb_rows, left=("notebook", "status"))}
<h2>Steps: keys and wall times</h2>{_table(steps, left=("step key", "finished"))}
<h2>Params</h2><details><summary>the run's resolved params.yaml</summary><pre>{html.escape(params_text)}</pre></details>
</main></body></html>
"""


def build_book(run_dir: str | os.PathLike, out: str | os.PathLike | None = None,
               sweep_dir: str | os.PathLike | None = None, exercises: str | os.PathLike | None = None) -> Path:
    """Render the site into ``out`` (default ``RUN_DIR/book``); the index page's path."""
    from .course.student import EXERCISES, write_student

    run_dir = Path(run_dir)
    if not (run_dir / "manifest.json").is_file():
        raise BookError(f"{run_dir}: no manifest.json; not a run directory (`hsr run PARAMS` makes one)")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    nbs = sorted(p for p in (run_dir / "notebooks").glob("[0-9][0-9]_*.ipynb") if ".failed" not in p.name) \
        if (run_dir / "notebooks").is_dir() else []
    if not nbs:
        raise BookError(f"{run_dir}: no executed notebooks in {run_dir / 'notebooks'}; run `hsr run` first")
    findings = None
    if sweep_dir is not None:
        sweep_dir = Path(sweep_dir)
        found = sorted(sweep_dir.glob("07_*.ipynb"))
        if not found:
            raise BookError(f"--sweep {sweep_dir}: no executed notebook 07 in it (`hsr sweep FILE` writes it)")
        findings = found[0]
    out = Path(out) if out is not None else run_dir / "book"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hsr-book-") as tmp:
        student = write_student(Path(tmp) / "exercises", exercises or EXERCISES)
        pages = [Page(f"{p.stem}.html", _title(p), p.name[:2], "run", p) for p in nbs]
        if findings is not None:
            pages.append(Page("findings.html", _title(findings), "07 findings", "sweep", findings))
        pages += [Page(f"exercises/{p.stem}.html", _title(p), f"E{int(p.name[:2])}", "exercises", p) for p in student]
        if (out / "exercises").is_dir():
            shutil.rmtree(out / "exercises")
        write_notebook_css(out)
        for i, page in enumerate(pages):
            render_page(page.notebook, pages, i, out)
    index = out / "index.html"
    index.write_text(index_html(run_dir, manifest, pages, sweep_dir), encoding="utf-8")
    return index
