"""The documentation names only things that exist: files, modules, commands and options.

Every page of ``docs/`` and the README is read: each repository path in backticks or a
link must exist, each ``desomdb.x.y`` name must import, and each ``desomdb COMMAND --option``
must be a command with that option. Stale names (a moved module, a renamed option) fail
here, not in a reader's terminal.
"""

import importlib
import re
from pathlib import Path

import click
import pytest

from desomdb.cli import main

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
#: Pages checked: the README and every docs page (the changelog records history, so names
#: of things that were since renamed are right there).
PAGES = [ROOT / "README.md", *sorted(p for p in DOCS.glob("*.md"))]
TOP = ("desomdb/", "tests/", "benchmarks/", "sql/", "docs/", "ingest/", "catalog/", ".ci/")
#: Outputs of a build or a benchmark, named by the docs but not committed.
GENERATED = ("docs/_build", "docs/_generated", "benchmarks/gpu_inputs")
FILES = ("README.md", "CHANGELOG.md", "CITATION.cff", "pyproject.toml", "CONTRIBUTING.md")
SPANS = re.compile(r"`([^`\n]+)`")
CODE = re.compile(r"```[^\n]*\n(.*?)```", re.S)


def _text(page: Path) -> str:
    return page.read_text()


def _paths(page: Path) -> set[str]:
    text = _text(page)
    found = set()
    for span in SPANS.findall(text) + CODE.findall(text):
        for token in re.split(r"[\s\"'(),=:;]+", span):
            token = token.rstrip(".")
            if (token.startswith(TOP) or token in FILES) and not token.startswith(GENERATED):
                if "*" in token or "<" in token or "{" in token:
                    continue
                found.add(token.split("::")[0])
    for link in re.findall(r"\]\(([^)#\s]+)", text):
        if "://" not in link:
            found.add(str((page.parent / link).resolve().relative_to(ROOT)))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_path_named_exists(page: Path) -> None:
    missing = sorted(p for p in _paths(page) if not (ROOT / p).exists())
    assert not missing, f"{page.name} names missing files: {missing}"


def _dotted(page: Path) -> set[str]:
    names = set()
    for span in SPANS.findall(_text(page)):
        for name in re.findall(r"(?<![/\w.])desomdb(?:\.[A-Za-z_]\w*)+", span):
            names.add(name)
    return names


def _resolve(name: str) -> bool:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_module_and_function_named_imports(page: Path) -> None:
    missing = sorted(n for n in _dotted(page) if not _resolve(n))
    assert not missing, f"{page.name} names what does not import: {missing}"


def _command_lines(page: Path) -> list[str]:
    text = _text(page)
    # commands: a code line that runs one ("$ desomdb ...", "desomdb ...", "... && desomdb
    # ...", "$(desomdb ...)"), or an inline span that is one; output lines and prose are not
    lines = [line.strip().removeprefix("$ ") for block in CODE.findall(text)
             for line in block.replace("\\\n", " ").splitlines()]
    lines += SPANS.findall(text)
    out = []
    for line in lines:
        for m in re.finditer(r"(?:^|&& |\| |\$\()desomdb ([a-z][a-z-]*)(.*)", line):
            rest = re.split(r"\s(?:\||&&|;|#)\s?|`|\)", m.group(2))[0]
            out.append(f"{m.group(1)}{rest}")
    return out


def _options(cmd: click.Command) -> set[str]:
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"--help", "-h"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_and_option_named_exists(page: Path) -> None:
    problems = []
    for line in _command_lines(page):
        words = line.split()
        cmd = main.commands.get(words[0])
        if cmd is None:
            problems.append(f"no command 'desomdb {words[0]}'")
            continue
        if isinstance(cmd, click.Group) and len(words) > 1 and not words[1].startswith("-"):
            sub = cmd.commands.get(words[1])
            if sub is None:
                problems.append(f"no command 'desomdb {words[0]} {words[1]}'")
                continue
            cmd = sub
        for opt in re.findall(r"(?<![\w-])(--?[a-z][a-z0-9-]*)", line):
            if opt not in _options(cmd):
                problems.append(f"'desomdb {words[0]}' has no option {opt}")
    assert not problems, f"{page.name}: {sorted(set(problems))}"


def test_the_front_page_reaches_every_page_and_the_cli() -> None:
    """Every page is in a toctree of the front page (two clicks to any command's section)."""
    index = _text(DOCS / "index.md")
    listed = set(re.findall(r"^([a-z][\w-]*)$", index, flags=re.M))
    pages = {p.stem for p in DOCS.glob("*.md")} | {p.stem for p in DOCS.glob("*.ipynb")}
    assert pages - {"index"} <= listed, sorted(pages - {"index"} - listed)
    assert "cli" in listed and ":nested: full" in _text(DOCS / "cli.md")
