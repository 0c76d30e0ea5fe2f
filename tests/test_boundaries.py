"""The architecture's boundaries, read from the imports: detection knows no HTTP, clients know no folders, ..."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "watcher"

# (modules under this prefix, may not import anything under these prefixes)
RULES = [
    ("watcher.detect", ["httpx", "httpx_sse", "watcher.services", "watcher.pipelines", "watcher.store", "sqlite3"]),
    ("watcher.services", ["watcher.pipelines", "watcher.detect", "watcher.store", "watchdog", "watcher.daemon"]),
    ("watcher.pipelines", ["watchdog", "watcher.detect", "watcher.daemon", "watcher.services", "httpx"]),
    ("watcher.store", ["httpx", "watcher.services", "watcher.pipelines", "watcher.detect", "watchdog"]),
    ("watcher.errors", ["watcher.", "httpx"]),
    ("watcher.config", ["watcher.store", "watcher.services", "watcher.pipelines", "watcher.detect", "httpx"]),
    ("watcher.emulator", ["watcher.pipelines", "watcher.detect", "watcher.store", "watcher.daemon", "watcher.runner"]),
]


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text("utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): imports_of(p) for p in sorted(PKG.rglob("*.py"))}


@pytest.mark.parametrize(("prefix", "forbidden"), RULES, ids=[r[0] for r in RULES])
def test_forbidden_imports(prefix, forbidden):
    """No module breaks the import rules of design.md."""
    offenders = [
        f"{mod} imports {imp}"
        for mod, imps in MODULES.items()
        if mod == prefix or mod.startswith(prefix + ".")
        for imp in imps
        for bad in forbidden
        if imp == bad.rstrip(".") or imp.startswith(bad if bad.endswith(".") else bad + ".") or imp == bad
    ]
    assert offenders == []


def test_rules_cover_real_modules():
    """Each rule names a package that exists, so a rename cannot silently disable it."""
    for prefix, _ in RULES:
        assert any(m == prefix or m.startswith(prefix + ".") for m in MODULES), prefix
