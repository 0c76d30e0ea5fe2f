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


# The layers of ARCHITECTURE.md, lowest first: a module may import from its own layer or any layer below,
# never from one above. The emulator is tooling beside the product: only the CLI starts it (`watcher emulate`),
# and it may use layers 0 to 2 only.
LAYERS = [
    ["watcher", "watcher.errors", "watcher.names", "watcher.sending", "watcher.versions"],
    [
        "watcher.config",
        "watcher.audiofile",
        "watcher.media",
        "watcher.fsutil",
        "watcher.safezip",
        "watcher.metrics",
        "watcher.log",
        "watcher.sdnotify",
    ],
    ["watcher.store", "watcher.detect", "watcher.services", "watcher.local"],
    ["watcher.pipelines", "watcher.analyzers", "watcher.webhooks", "watcher.status"],
    ["watcher.runner", "watcher.events"],
    ["watcher.app", "watcher.dryrun", "watcher.doctor", "watcher.backfill"],
    ["watcher.daemon", "watcher.commands", "watcher.control", "watcher.steering", "watcher.web"],
    ["watcher.cli", "watcher.__main__", "watcher.emulator"],
]
TOOLING_LIMIT = {"watcher.emulator": 2}


def layer_of(module: str) -> tuple[int, str]:
    """The layer of a module and the listed name it falls under (the longest that matches); (-1, "") if none."""
    best, found = "", -1
    for n, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > len(best):
                best, found = name, n
    return found, best


def test_imports_only_go_down_the_layers():
    """Every import between the package's parts goes to the same layer or a lower one; the emulator uses only the
    lowest three; every module belongs to a layer, so a new one must be placed before it can land."""
    assert [m for m in MODULES if layer_of(m)[0] < 0] == []
    upward = []
    for mod, imports in MODULES.items():
        mine, name = layer_of(mod)
        limit = TOOLING_LIMIT.get(name, mine)
        for imp in imports:
            theirs, other = layer_of(imp)
            if imp.startswith("watcher") and other != name and theirs > limit:
                upward.append(f"{mod} (layer {mine}) imports {imp} (layer {theirs})")
    assert upward == []
