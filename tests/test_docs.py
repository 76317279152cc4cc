"""The documentation site: it builds in strict mode (a broken link or a page missing from the nav
fails), reads offline (nothing from a CDN, code highlighted at build time), its API reference is
generated from the code, and its Markdown lists render as lists."""

from __future__ import annotations

import ast
import html
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
INSTALL = "pip install -r requirements-docs.txt"
# Hosts a page would load fonts, highlighters or scripts from.
CDN = re.compile(r"https?://[^\s\"'<>)]*(fonts\.googleapis|fonts\.gstatic|cdn|unpkg|jsdelivr)",
                 re.IGNORECASE)
LIST_ITEM = re.compile(r"\s*([-*+] |\d+\. )")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(module, reason=f"{module} is not installed ({INSTALL})")
    folder = tmp_path_factory.mktemp("docs") / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(folder)],
        cwd=ROOT, check=False, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def page_text(site: Path, page: str) -> str:
    """A built page's visible text, tags removed and whitespace collapsed."""
    source = (site / page / "index.html").read_text(encoding="utf-8")
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", source)).split())


def test_docs_site_builds_strictly(site: Path) -> None:
    assert (site / "index.html").exists()
    assert (site / "api" / "index.html").exists()
    assert "assets/stylesheets" in (site / "index.html").read_text()  # the Material theme


def test_the_site_loads_nothing_from_a_cdn(site: Path) -> None:
    pages = sorted(site.rglob("*.html")) + sorted(site.rglob("*.css"))
    assert len(pages) > 20
    found = [f"{path.relative_to(site)}: {match.group(0)}"
             for path in pages for match in CDN.finditer(path.read_text(encoding="utf-8"))]
    assert not found, "\n".join(found)
    for path in site.rglob("*.html"):
        text = path.read_text(encoding="utf-8")
        remote = re.findall(r"<(?:script|link)\b[^>]*(?:src|href)=\"(?:https?:)?//[^\"]+\"", text)
        assert not remote, (path.relative_to(site), remote)


def test_code_is_highlighted_when_the_site_is_built(site: Path) -> None:
    index = (site / "index.html").read_text(encoding="utf-8")
    assert '<span class="kn">import</span>' in index  # Pygments' token classes, in the HTML
    assert "hljs" not in index and "highlight.js" not in index


def docstring_and_parameters(path: Path, name: str, method: str | None = None
                             ) -> tuple[str, list[str]]:
    """The first docstring line and the parameter names of a function or class in the code,
    read without importing it."""
    tree = ast.parse(path.read_text())
    node = next(n for n in ast.walk(tree)
                if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == name)
    function = node if method is None else next(
        n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == method)
    arguments = function.args
    names = [a.arg for a in arguments.posonlyargs + arguments.args + arguments.kwonlyargs]
    first_line = " ".join(ast.get_docstring(node).split("\n\n")[0].split())
    return first_line, [n for n in names if n not in ("self", "cls")]


@pytest.mark.parametrize("page, path, name, method", [
    ("reference/purified_model", "purifyguard/purified_model.py", "PurifiedModel", "__init__"),
    ("reference/purifier", "purifyguard/purifier.py", "Purifier", "__init__"),
    ("reference/evaluation", "purifyguard/evaluation/harness.py", "evaluate", None),
])
def test_the_reference_is_generated_from_the_code(site: Path, page, path, name, method) -> None:
    docstring, parameters = docstring_and_parameters(ROOT / path, name, method)
    text = page_text(site, page)
    assert docstring in text
    signature = text[text.index(f"{name} ("):]
    for parameter in parameters:
        assert re.search(rf"\b{parameter}\b", signature), f"{name}: {parameter} not documented"


def markdown_lines(path: Path) -> list[tuple[int, str]]:
    """Lines outside fenced code blocks, numbered from 1."""
    lines, fenced = [], False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append((number, line))
    return lines


@pytest.mark.parametrize("path", sorted(DOCS.glob("*.md")), ids=lambda path: path.name)
def test_lists_render_as_lists(path: Path) -> None:
    """Python-Markdown needs a blank line between a paragraph and a list (else the items run on
    as one paragraph) and indents nested items by 4 spaces (else they are not nested)."""
    problems, block = [], []
    for number, line in markdown_lines(path):
        if not line.strip():
            block = []
            continue
        if LIST_ITEM.match(line):
            nested = len(line) - len(line.lstrip())
            if 0 < nested < 4:
                problems.append(f"{path.name}:{number}: nested item indented by {nested} spaces")
            if block and not any(LIST_ITEM.match(b) or b.startswith(("|", "    ")) for b in block):
                problems.append(f"{path.name}:{number}: list right after a paragraph line")
        block.append(line)
    assert not problems, "\n".join(problems)
