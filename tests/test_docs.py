"""The documentation site: it builds in strict mode (a broken link or a page missing from the nav
fails), reads offline (nothing from a CDN, code highlighted at build time), its API reference is
generated from the code, and its Markdown lists render as lists."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import html
import importlib
import inspect
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

import purifyguard

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


# --- The Python code blocks of the pages a user copies from, checked against the code ---------
#
# A cheap, static check: no model runs. Every ```python block of the pages below must parse; every
# purifyguard name it imports or reaches by attribute (purifyguard.evaluation.markdown_table)
# must exist; and every call it makes to a purifyguard function or class, or to a method of a
# PurifiedModel or Purifier it built, must bind to that callable's signature
# (inspect.signature(...).bind_partial with the block's positional count and keyword names).
# An instance's type is followed through assignments (`model = PurifiedModel(...)`,
# `fast = purifier.with_settings(...)`: a callable's return annotation names it), page by page,
# and calling an instance calls its forward. Keywords that a method passes on through **kwargs
# are bound where they land (FORWARDED below). A name assigned two different types on one page
# is not followed. Placeholders (`<your-name>/<repo>`) are allowed in comments only on the
# pages in PASTED: their code runs as pasted, so it never holds a placeholder repo id.
CODE_PAGES = [ROOT / "README.md", DOCS / "index.md", DOCS / "api.md", DOCS / "architecture.md"]
PASTED = [ROOT / "README.md", DOCS / "index.md", DOCS / "api.md"]
PYTHON_BLOCK = re.compile(r"^```(?:python|py)\n(.*?)^```", re.MULTILINE | re.DOTALL)
# String constants that stand for the reader's own repo or folder: <...>, user/..., path/or/...
PLACEHOLDER = re.compile(r"<[^<>]+>|^(user|your-name|your_name|me)/|^path/or/")


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """(first line number, code) of each ```python block of a Markdown file."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, match.start(1)) + 1, match.group(1))
            for match in PYTHON_BLOCK.finditer(text)]


def test_the_pages_have_python_blocks() -> None:
    for path in CODE_PAGES:
        assert python_blocks(path), f"{path.name}: no ```python block found (fence changed?)"


@pytest.mark.parametrize("path", CODE_PAGES, ids=lambda path: path.name)
def test_the_code_blocks_parse(path: Path) -> None:
    for line, code in python_blocks(path):
        try:
            ast.parse(code)
        except SyntaxError as error:
            pytest.fail(f"{path.name}:{line + (error.lineno or 1) - 1}: {error.msg}")


class _Instance:
    """What a name holds: an instance of a purifyguard class."""

    def __init__(self, cls: type) -> None:
        self.cls = cls


class _Method:
    """A method looked up on an instance, not yet called."""

    def __init__(self, cls: type, name: str) -> None:
        self.cls, self.name = cls, name


class _Missing(_Method):
    """A name that neither an instance's class nor its code (self.<name> = ...) defines."""


def _sets_attribute(cls: type, name: str) -> bool:
    """Whether the code of the class or a purifyguard base assigns self.<name>."""
    pattern = re.compile(rf"self\.{re.escape(name)}\s*(:[^=\n]*)?=[^=]")
    return any(pattern.search(inspect.getsource(base)) for base in cls.__mro__
               if base.__module__.startswith("purifyguard"))


def _forwarded() -> dict[tuple[type, str], list]:
    """Where a method's **kwargs go: (class, method) -> the signatures that accept them."""
    from purifyguard import PurifiedModel, Purifier, PurifierConfig

    config = inspect.signature(PurifierConfig)
    return {
        (PurifiedModel, "purify"): [_without_first(inspect.signature(Purifier.purify), 2)],
        (PurifiedModel, "from_pretrained"): [config],
        (Purifier, "__init__"): [config],
        (Purifier, "from_pretrained"): [config],
        (Purifier, "from_diffusers"): [config],
        (Purifier, "with_settings"): [config],
    }


def _without_first(signature: inspect.Signature, count: int) -> inspect.Signature:
    """A signature less its first `count` parameters (self and the images), keywords only."""
    parameters = list(signature.parameters.values())[count:]
    return signature.replace(parameters=parameters)


class _BlockChecker:
    """Follows one page's blocks in order, collecting what does not match the code."""

    def __init__(self, page: str) -> None:
        self.page = page
        self.names: dict[str, Any] = {}
        self.conflicting: set[str] = set()
        self.problems: list[str] = []
        self.forwarded = _forwarded()
        self.line = 0

    def fail(self, node: ast.AST, message: str) -> None:
        self.problems.append(f"{self.page}:{self.line + getattr(node, 'lineno', 1) - 1}: {message}")

    def run(self, line: int, code: str) -> None:
        self.line = line
        for statement in ast.parse(code).body:
            self.statement(statement)

    def statement(self, node: ast.stmt) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "purifyguard":
                    module = self.import_module(node, alias.name)
                    if module is not None:
                        top = alias.asname or alias.name.split(".")[0]
                        self.names[top] = module if alias.asname else importlib.import_module(
                            "purifyguard")
            return
        if isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] == "purifyguard":
                module = self.import_module(node, node.module)
                for alias in node.names if module is not None else []:
                    value = getattr(module, alias.name, None)
                    if value is None:
                        try:
                            value = importlib.import_module(f"{node.module}.{alias.name}")
                        except ImportError:
                            self.fail(node, f"{node.module} has no {alias.name}")
                            continue
                    self.names[alias.asname or alias.name] = value
            return
        if isinstance(node, ast.Assign):
            value = self.expression(node.value)
            for target in node.targets:
                if isinstance(target, ast.Name):
                    self.assign(target.id, value)
                else:
                    self.expression(target)
            return
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.stmt):
                self.statement(child)
            else:
                self.expression(child)

    def assign(self, name: str, value: Any) -> None:
        if not isinstance(value, _Instance) or name in self.conflicting:
            self.names.pop(name, None)
            return
        known = self.names.get(name)
        if isinstance(known, _Instance) and known.cls is not value.cls:
            self.conflicting.add(name)
            del self.names[name]
        else:
            self.names[name] = value

    def import_module(self, node: ast.AST, name: str):
        try:
            return importlib.import_module(name)
        except ImportError as error:
            self.fail(node, f"import {name}: {error}")
            return None

    def expression(self, node: ast.AST) -> Any:
        """What an expression evaluates to, where it is purifyguard's (else None); checks every
        call and attribute on the way."""
        if isinstance(node, ast.Name):
            return self.names.get(node.id)
        if isinstance(node, ast.Attribute):
            return self.attribute(node, self.expression(node.value))
        if isinstance(node, ast.Call):
            function = self.expression(node.func)
            for child in [*node.args, *(k.value for k in node.keywords)]:
                self.expression(child)
            return self.call(node, function)
        for child in ast.iter_child_nodes(node):
            self.expression(child)
        return None

    def attribute(self, node: ast.Attribute, base: Any) -> Any:
        if isinstance(base, types.ModuleType) and base.__name__.startswith("purifyguard"):
            if hasattr(base, node.attr):
                return getattr(base, node.attr)
            try:
                return importlib.import_module(f"{base.__name__}.{node.attr}")
            except ImportError:
                self.fail(node, f"{base.__name__} has no {node.attr}")
                return None
        if isinstance(base, type) and base.__module__.startswith("purifyguard"):
            if not hasattr(base, node.attr):
                self.fail(node, f"{base.__name__} has no {node.attr}")
                return None
            return getattr(base, node.attr)
        if isinstance(base, _Instance):
            if callable(inspect.getattr_static(base.cls, node.attr, None)):
                return _Method(base.cls, node.attr)
            if not _sets_attribute(base.cls, node.attr) and not hasattr(base.cls, node.attr):
                return _Missing(base.cls, node.attr)
            return None  # an attribute or property: not followed
        return None

    def call(self, node: ast.Call, function: Any) -> Any:
        if isinstance(function, _Missing):
            self.fail(node, f"{function.cls.__name__} has no method {function.name}")
            return None
        if isinstance(function, _Instance):  # an nn.Module called: its forward
            function = _Method(function.cls, "forward")
        if isinstance(function, _Method):
            owner, name = function.cls, function.name
            static = inspect.getattr_static(owner, name)
            target = getattr(owner, name)
            self_arg = 0 if isinstance(static, (staticmethod, classmethod)) else 1
        elif callable(function) and getattr(function, "__module__", "").startswith("purifyguard"):
            target, self_arg = function, 0
            owner, name = (function, "__init__") if isinstance(function, type) else (None, None)
            if owner is None and inspect.ismethod(function) and isinstance(function.__self__, type):
                owner, name = function.__self__, function.__name__  # a classmethod
        else:
            return None
        self.bind(node, target, self_arg, owner, name)
        return self.result(function, target)

    def bind(self, node: ast.Call, target, self_arg: int, owner, name) -> None:
        if any(isinstance(a, ast.Starred) for a in node.args) or any(
                k.arg is None for k in node.keywords):
            return  # *args or **kwargs: not checked statically
        signature = inspect.signature(target)
        label = f"{owner.__name__}.{name}" if owner is not None else target.__name__
        keywords = {k.arg: None for k in node.keywords}
        try:
            bound = signature.bind_partial(*[None] * (self_arg + len(node.args)), **keywords)
        except TypeError as error:
            self.fail(node, f"{label}{signature}: {error}")
            return
        spread = [p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD]
        extra = bound.arguments.get(spread[0], {}) if spread else {}
        for accepting in self.forwarded.get((owner, name), []) if extra else []:
            try:
                accepting.bind_partial(**extra)
            except TypeError as error:
                self.fail(node, f"{label} passes {sorted(extra)} on to {accepting}: {error}")

    def result(self, function: Any, target: Any) -> Any:
        """An instance when the call builds or returns a PurifiedModel or Purifier."""
        from purifyguard import PurifiedModel, Purifier, PurifierConfig

        known = {c.__name__: c for c in (PurifiedModel, Purifier, PurifierConfig)}
        if isinstance(function, type):
            return _Instance(function)
        returned = str(inspect.signature(target).return_annotation).strip("'\"")
        if returned in known:
            return _Instance(known[returned])
        owner = function.cls if isinstance(function, _Method) else getattr(
            getattr(function, "__self__", None), "__name__", None) and function.__self__
        if returned in ("PurifierT", "Self") and isinstance(owner, type):
            return _Instance(owner)
        return None


@pytest.mark.parametrize("path", CODE_PAGES, ids=lambda path: path.name)
def test_the_code_blocks_call_the_api_as_it_is(path: Path) -> None:
    checker = _BlockChecker(path.relative_to(ROOT).as_posix())
    for line, code in python_blocks(path):
        checker.run(line, code)
    assert not checker.problems, "\n".join(checker.problems)


def test_the_block_checker_catches_what_it_is_for() -> None:
    """The checker on known mistakes: each must be reported."""
    mistakes = {
        "import purifyguard\npurifier = purifyguard.load_purifier('x')\npurifier(images, seed=0)":
            "Purifier.forward",
        "from purifyguard import Purifier\np = Purifier.from_pretrained('x')\np.purify(x, sed=1)":
            "Purifier.purify",
        "import purifyguard\nm = purifyguard.PurifiedModel(c)\nm.purify(x, sed=1)":
            "PurifiedModel.purify passes ['sed']",
        "from purifyguard import Purifier\np = Purifier.from_pretrained('x')\n"
        "q = p.with_settings(t_sta=1)": "Purifier.with_settings passes ['t_sta']",
        "from purifyguard import no_such_name": "purifyguard has no no_such_name",
        "import purifyguard\npurifyguard.evaluation.no_such_function()": "has no no_such_function",
        "import purifyguard\nm = purifyguard.PurifiedModel(c)\nm.no_such_method()":
            "PurifiedModel has no",
    }
    for code, expected in mistakes.items():
        checker = _BlockChecker("example")
        checker.run(1, code)
        assert any(expected in problem for problem in checker.problems), (code, checker.problems)
    fine = _BlockChecker("example")
    fine.run(1, "import purifyguard\nm = purifyguard.PurifiedModel(c, 'x', n_samples=2)\n"
                "p = m.purify(x, seed=0)\nm.purifier.purify(x, seed=0)\nm(x)")
    assert not fine.problems, fine.problems


@pytest.mark.parametrize("path", PASTED, ids=lambda path: path.name)
def test_pasted_code_holds_no_placeholder_repo(path: Path) -> None:
    """A line like PurifiedModel(clf, "user/purifier-repo") fails as pasted (it asks the Hub for
    a repo nobody has); such lines are comments, with the placeholder in <...>."""
    found = []
    for line, code in python_blocks(path):
        for node in ast.walk(ast.parse(code)):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and PLACEHOLDER.search(node.value)):
                found.append(f"{path.name}:{line + node.lineno - 1}: {node.value!r}")
    assert not found, "\n".join(found)


# --- The registered purifiers, as the pages list them ------------------------------------------
# A registered-looking name: fashion-mnist-* or cifar10-*, not inside another name or a repo id
# (google/ddpm-cifar10-32); the bundled classifiers' names have the same form and are told apart.
REGISTERED_LOOKING = re.compile(r"(?<![\w/.-])((?:fashion-mnist|cifar10)-[a-z0-9]+(?:-[a-z0-9]+)*)")


@pytest.mark.parametrize("page", ["api.md", "cli.md"])
def test_the_pages_list_the_registered_purifiers(page: str) -> None:
    from purifyguard.presets import CLASSIFIERS
    from purifyguard.registry import registered

    text = (DOCS / page).read_text(encoding="utf-8")
    names = purifyguard.list_purifiers()
    missing = [name for name in names if f"`{name}`" not in text and f"{name}:" not in text
               and f"{name} (default)" not in text]
    assert not missing, f"{page} does not list the registered {missing}"
    unknown = sorted(set(REGISTERED_LOOKING.findall(text)) - set(names) - set(CLASSIFIERS))
    assert not unknown, f"{page} names {unknown}, which are not registered ({names})"
    if page == "api.md":  # its table says which is the default for its input
        for name in names:
            row = next(line for line in text.splitlines() if line.startswith(f"| `{name}` |"))
            assert ("default" in row) == registered(name).default, row


def config_field_descriptions() -> dict[str, str]:
    """PurifierConfig's Attributes section: field -> description, whitespace collapsed."""
    from purifyguard import PurifierConfig

    section = inspect.getdoc(PurifierConfig).split("Attributes:\n", 1)[1]
    entries = re.findall(r"^    (\w+): (.*?)(?=^    \w+: |\Z)", section, re.MULTILINE | re.DOTALL)
    return {name: " ".join(text.split()) for name, text in entries}


def test_every_config_field_is_described() -> None:
    from purifyguard import PurifierConfig

    described = config_field_descriptions()
    assert list(described) == [f.name for f in dataclasses.fields(PurifierConfig)]
    assert all(len(text) > 10 for text in described.values()), described


def test_the_config_reference_shows_the_field_descriptions(site: Path) -> None:
    text = page_text(site, "reference/config")
    missing = [name for name, description in config_field_descriptions().items()
               if " ".join(description.split()[:6]) not in text]
    assert not missing, f"reference/config: no description rendered for {missing}"


# --- The demo's picture (docs/images/demo.png): the bare classifier fooled, the defence's answer --
class _StandIn(torch.nn.Module):
    """A defended model whose bare and purified predictions differ: classify reads the mean
    pixel (dark: class 0, light: class 9), purify inverts the image."""

    def __init__(self) -> None:
        super().__init__()
        self.purifier = "stand-in"
        self.weight = torch.nn.Parameter(torch.linspace(-3, 3, 10))

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        return 1 - x

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1).mean(1, keepdim=True) - 0.5) * self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.purify(x))


def test_the_demo_picture_labels_the_adversarial_image_with_the_bare_classifier(
        tmp_path, monkeypatch) -> None:
    from purifyguard import demo
    from purifyguard.evaluation import grid
    from purifyguard.evaluation.adversarial_files import save_adversarial
    from purifyguard.evaluation.attacks import AttackSpec

    model = _StandIn()
    images, adversarial = torch.full((3, 1, 4, 4), 0.9), torch.full((3, 1, 4, 4), 0.1)
    labels = torch.tensor([9, 9, 9])
    spec = AttackSpec(kind="transfer", norm="linf", eps=0.1, steps=1, eot=1)
    save_adversarial(tmp_path / "transfer", "purified", spec.label, adversarial[:2])
    drawn = []
    original = grid.grid_columns
    monkeypatch.setattr(grid, "grid_columns",
                        lambda *a, **k: drawn.append(original(*a, **k)) or drawn[-1])
    args = argparse.Namespace(seed=0, classifier="fashion-mnist-resnet18", steps=1, eps=0.1)

    path = demo.save_picture(model, spec, images, labels, [str(i) for i in range(10)],
                             tmp_path, args)

    assert path == tmp_path / "demo.png" and path.read_bytes().startswith(b"\x89PNG")
    _, attacked, purified = drawn[0]
    bare = model.classify(adversarial[:2]).argmax(-1)
    defended = model.classify(1 - adversarial[:2]).argmax(-1)
    assert not torch.equal(bare, defended)  # the stand-in tells the two apart
    assert torch.equal(attacked.predictions, bare)
    assert torch.equal(purified.predictions, defended)
    assert torch.equal(purified.images, 1 - adversarial[:2])


def test_the_evaluation_grid_keeps_labelling_the_adversarial_image_with_the_purification() -> None:
    from purifyguard.evaluation.grid import grid_columns

    model = _StandIn()
    adversarial = torch.full((2, 1, 4, 4), 0.1)
    columns = grid_columns(model, adversarial, adversarial)
    assert torch.equal(columns[1].predictions, columns[2].predictions)
    with pytest.raises(ValueError, match="adversarial_prediction"):
        grid_columns(model, adversarial, adversarial, adversarial_prediction="clean")


def test_the_docs_show_the_demo_picture() -> None:
    assert "images/demo.png" in (DOCS / "index.md").read_text(encoding="utf-8")
    assert (DOCS / "images" / "demo.png").read_bytes().startswith(b"\x89PNG")
