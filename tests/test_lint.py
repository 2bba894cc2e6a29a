"""The tree stays clean: ruff (lint and format), and every relative link in the docs resolves."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _ruff() -> list[str]:
    found = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if found is None:
        pytest.fail("ruff is not installed (it comes with the [test] extra)")
    return [found]


@pytest.mark.parametrize(
    "args", [["check", "."], ["format", "--check", "."]], ids=["check", "format"]
)
def test_ruff(args):
    result = subprocess.run([*_ruff(), *args], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Markdown links -------------------------------------------------------------

#: ``[text](target)``, not an image; the target ends at the first space or ``)``.
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _anchors(path: Path) -> set[str]:
    """The fragment each heading of ``path`` gets on GitHub: lower case, punctuation
    dropped, spaces as hyphens, a repeated one suffixed ``-1``, ``-2``..."""
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", _FENCE.sub("", path.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def _relative_links() -> list[tuple[Path, str]]:
    links = []
    for path in _markdown_files():
        text = _FENCE.sub("", path.read_text())
        for target in _LINK.findall(text):
            if not re.match(r"[a-z][a-z0-9+.-]*:", target):  # not http:, mailto:...
                links.append((path, target))
    return links


def test_the_docs_have_relative_links_to_check():
    """The check below would pass vacuously if the pattern stopped matching."""
    targets = {target for _, target in _relative_links()}
    assert "docs/api.md" in targets and any("#" in target for target in targets)


@pytest.mark.parametrize(
    ("source", "target"),
    sorted({(path.relative_to(ROOT).as_posix(), target) for path, target in _relative_links()}),
)
def test_every_relative_markdown_link_resolves(source, target):
    """Every relative link in README.md and docs/ names a file of the repository, and
    its ``#fragment`` (if any) a heading of that file."""
    base = (ROOT / source).parent
    file_part, _, fragment = target.partition("#")
    path = (base / file_part).resolve() if file_part else ROOT / source
    assert path.is_file(), f"{source}: {target} names no file"
    assert ROOT in path.parents, f"{source}: {target} leaves the repository"
    if fragment and path.suffix == ".md":
        assert fragment in _anchors(path), f"{source}: {target} names no heading of {path.name}"


def _imports(packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Module -> the modules of ``packages`` it imports, function-level imports included."""
    import ast

    files = {}
    for package in packages:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            files[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                parts = name.split(".")
                if path.name != "__init__.py":
                    parts = parts[:-1]
                if node.level:
                    parts = parts[: len(parts) - node.level + 1]
                    module = ".".join(parts + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                subs = [f"{module}.{alias.name}" for alias in node.names]
                targets = [t for t in subs if t in files] or [module]
            graph[name] |= {t for t in targets if t in files and t != name}
    return graph


def test_no_import_cycles():
    """No module of the package or the built-in backends imports itself back, even
    through an import inside a function."""
    graph = _imports(("optin_service", "backends"))
    cycles = []

    def walk(name: str, path: list[str]) -> None:
        for target in sorted(graph[name]):
            if target in path:
                cycles.append([*path[path.index(target) :], target])
            elif target not in done:
                walk(target, [*path, target])
        done.add(name)

    done: set[str] = set()
    for name in sorted(graph):
        walk(name, [name])
    assert not cycles, cycles


def test_the_readme_names_every_setting():
    """Every OPTIN_* setting of defaults.py is in the README's configuration table."""
    from optin_service import defaults

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Configuration") : readme.index("### Storage")]
    missing = [name for name in defaults.DEFAULTS if f"`{name}`" not in table]
    assert not missing, missing
