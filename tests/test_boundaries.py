"""The architecture's boundaries, read from the imports: detection knows no HTTP, clients know no folders, every
module sits in one layer of ARCHITECTURE.md and imports only from its own layer or a lower one."""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "watcher"
ARCHITECTURE = ROOT / "ARCHITECTURE.md"

# (modules under this prefix, may not import anything under these prefixes): the edges that "Who talks to whom"
# in ARCHITECTURE.md forbids, whatever the layers allow.
RULES = [
    ("watcher.detect", ["httpx", "httpx_sse", "watcher.services", "watcher.pipelines", "watcher.store", "sqlite3"]),
    ("watcher.services", ["watcher.pipelines", "watcher.detect", "watcher.store", "watchdog", "watcher.daemon"]),
    ("watcher.pipelines", ["watchdog", "watcher.detect", "watcher.daemon", "watcher.services", "httpx"]),
    ("watcher.store", ["httpx", "watcher.services", "watcher.pipelines", "watcher.detect", "watchdog"]),
    ("watcher.errors", ["watcher", "httpx"]),
    ("watcher.config", ["watcher.store", "watcher.services", "watcher.pipelines", "watcher.detect", "httpx"]),
    ("watcher.emulator", ["watcher.pipelines", "watcher.detect", "watcher.store", "watcher.daemon", "watcher.runner"]),
]


def module_name(path: Path, root: Path) -> str:
    """``watcher.detect.poll`` for ``watcher/detect/poll.py`` under ``root``; a package is named by its ``__init__``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_in(source: str, module: str, *, is_package: bool, known: set[str]) -> set[str]:
    """The modules ``source`` (the text of ``module``) imports, wherever the import statement stands.

    ``from a import b`` counts as an import of the module ``a.b`` when ``known`` has it (``from watcher import
    runner`` imports ``watcher.runner``), else of ``a``; relative imports are resolved against ``module``.
    """
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else base)
    return found


def read_package(root: Path, package: str = "watcher") -> dict[str, set[str]]:
    """Every module of ``root/package`` and the modules it imports."""
    paths = sorted((root / package).rglob("*.py"))
    known = {module_name(p, root) for p in paths}
    return {
        module_name(p, root): imports_in(
            p.read_text("utf-8"), module_name(p, root), is_package=p.name == "__init__.py", known=known
        )
        for p in paths
    }


MODULES = read_package(ROOT)


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def offenders(modules: Mapping[str, set[str]], prefix: str, forbidden: Sequence[str]) -> list[str]:
    """Each import of a module under ``prefix`` that goes to a ``forbidden`` one."""
    return [
        f"{mod} imports {imp}"
        for mod, imps in sorted(modules.items())
        if under(mod, prefix)
        for imp in sorted(imps)
        if any(under(imp, bad) for bad in forbidden)
    ]


@pytest.mark.parametrize(("prefix", "forbidden"), RULES, ids=[r[0] for r in RULES])
def test_forbidden_imports(prefix: str, forbidden: list[str]) -> None:
    """No module crosses a boundary that RULES (from ARCHITECTURE.md's "Who talks to whom") forbids."""
    assert offenders(MODULES, prefix, forbidden) == []


def test_rules_cover_real_modules() -> None:
    """Each rule names a package that exists, so a rename cannot silently disable it."""
    for prefix, _ in RULES:
        assert any(under(m, prefix) for m in MODULES), prefix


# -- layers --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """One row of the Layers table: ``rank`` is how high it stands (who may import it: the same rank or above),
    ``ceiling`` the highest layer it may import from (its own rank, except for tooling)."""

    label: str
    rank: int
    ceiling: int
    names: tuple[str, ...]  # as the table writes them: ``runner`` one module, ``store/`` a package, ``__init__``


def read_layers(text: str) -> list[Layer]:
    """The rows of the "## Layers" table: ``| 3 work | `pipelines/`, `status` | notes |``; a tooling row
    (``| tooling: layers 0-2 only | ...``) stands with the top layer for its importers and may use the given ones."""
    section = text.split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| layer ")]
    numbered: list[tuple[str, int, tuple[str, ...]]] = []
    tooling: list[tuple[str, int, tuple[str, ...]]] = []
    for row in rows:
        label, modules = (cell.strip() for cell in row.strip("|").split("|")[:2])
        names = tuple(re.findall(r"`([^`]+)`", modules))
        if m := re.fullmatch(r"(\d+) .+", label):
            numbered.append((label, int(m.group(1)), names))
        elif m := re.fullmatch(r"tooling: layers 0[–-](\d+) only", label):
            tooling.append((label, int(m.group(1)), names))
        else:
            raise AssertionError(f"ARCHITECTURE.md, Layers: a row the test cannot read: {row!r}")
    top = max(rank for _, rank, _ in numbered)
    return [Layer(label, rank, rank, names) for label, rank, names in numbered] + [
        Layer(label, top, ceiling, names) for label, ceiling, names in tooling
    ]


LAYERS = read_layers(ARCHITECTURE.read_text("utf-8"))


def placing(name: str) -> tuple[str, bool]:
    """The module a table entry names, and whether it covers the modules under it (a package written ``x/``)."""
    if name == "__init__":
        return "watcher", False
    return "watcher." + name.rstrip("/").replace("/", "."), name.endswith("/")


def layer_of(module: str, layers: Sequence[Layer]) -> tuple[Layer, str] | None:
    """The layer of ``module`` and the entry that places it (the longest that matches), or None."""
    best: tuple[Layer, str] | None = None
    for layer in layers:
        for name in layer.names:
            target, covers = placing(name)
            if (module == target or (covers and under(module, target))) and (
                best is None or len(target) > len(placing(best[1])[0])
            ):
                best = (layer, name)
    return best


def problems(modules: Mapping[str, set[str]], layers: Sequence[Layer]) -> list[str]:
    """What breaks the layering: a module in no layer, a table entry that names no module, an upward import."""
    found = [
        f"{mod} is in no layer: add `{mod.removeprefix('watcher.').replace('.', '/')}` to the row of its layer "
        "in the Layers table of ARCHITECTURE.md (this test reads the table)"
        for mod in sorted(modules)
        if layer_of(mod, layers) is None
    ]
    for layer in layers:
        for name in layer.names:
            target, covers = placing(name)
            if not any(m == target or (covers and under(m, target)) for m in modules):
                found.append(f"ARCHITECTURE.md, Layers, row {layer.label!r}: `{name}` names no module; remove it")
    for mod in sorted(modules):
        mine = layer_of(mod, layers)
        if mine is None:
            continue
        for imp in sorted(modules[mod]):
            theirs = layer_of(imp, layers) if under(imp, "watcher") else None
            if theirs is None or theirs[1] == mine[1]:
                continue  # outside the package, or within one package of the table
            if theirs[0].rank > mine[0].ceiling:
                found.append(
                    f"{mod} ({mine[0].label}) imports {imp} ({theirs[0].label}): an import may only go to the same "
                    f"layer or one below (up to layer {mine[0].ceiling})"
                )
    return found


def test_every_module_is_in_a_layer_and_imports_only_go_down() -> None:
    """Every module of the package is placed in one layer of ARCHITECTURE.md, every entry there names a module,
    and every import between the package's parts goes to the same layer or a lower one (the emulator: 0 to 2)."""
    assert problems(MODULES, LAYERS) == []


def test_the_layers_are_the_numbered_rows_and_the_emulator() -> None:
    """The table is read as written: eight numbered layers from 0, and the emulator as tooling using 0 to 2."""
    assert sorted({layer.rank for layer in LAYERS if layer.rank == layer.ceiling}) == list(range(8))
    assert [(layer.names, layer.rank, layer.ceiling) for layer in LAYERS if layer.rank != layer.ceiling] == [
        (("emulator/",), 7, 2)
    ]


# -- the test of the test: the checker fails on planted violations ----------------------------------------------


def plant(root: Path, files: Mapping[str, str]) -> dict[str, set[str]]:
    for rel, source in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source, "utf-8")
    return read_package(root)


def test_the_check_fails_on_an_upward_import_in_any_spelling(tmp_path: Path) -> None:
    """A leaf importing the runner is caught whether written ``import``, ``from watcher import runner``, or
    relative; a pipeline importing the emulator is caught too; ``from watcher import __version__`` is not."""
    modules = plant(
        tmp_path,
        {
            "watcher/__init__.py": "__version__ = '0'\n",
            "watcher/errors.py": "from watcher import runner\n",
            "watcher/names.py": "import watcher.runner\n",
            "watcher/versions.py": "from . import runner\n",
            "watcher/sending.py": "from watcher import __version__\n",
            "watcher/runner.py": "from watcher.errors import x\n",
            "watcher/pipelines/__init__.py": "from .. import emulator\n",
            "watcher/emulator/__init__.py": "def f():\n    from watcher.pipelines import y\n",
        },
    )
    assert modules["watcher.errors"] == {"watcher.runner"}
    assert modules["watcher.sending"] == {"watcher"}
    upward = [p for p in problems(modules, LAYERS) if " imports " in p]
    assert upward == [
        "watcher.emulator (tooling: layers 0–2 only) imports watcher.pipelines (3 work): an import may only go to "
        "the same layer or one below (up to layer 2)",
        "watcher.errors (0 leaves) imports watcher.runner (4 scheduling): an import may only go to the same layer "
        "or one below (up to layer 0)",
        "watcher.names (0 leaves) imports watcher.runner (4 scheduling): an import may only go to the same layer "
        "or one below (up to layer 0)",
        "watcher.pipelines (3 work) imports watcher.emulator (tooling: layers 0–2 only): an import may only go to "
        "the same layer or one below (up to layer 3)",
        "watcher.versions (0 leaves) imports watcher.runner (4 scheduling): an import may only go to the same "
        "layer or one below (up to layer 0)",
    ]


def test_the_check_fails_on_a_module_in_no_layer(tmp_path: Path) -> None:
    """A new module (or package) that no row names is reported with the entry to add and where; nothing else
    silently places it, not even the package's own name."""
    modules = plant(
        tmp_path,
        {
            "watcher/__init__.py": "",
            "watcher/errors.py": "",
            "watcher/newthing.py": "from watcher import errors\n",
            "watcher/queue/__init__.py": "",
            "watcher/queue/disk.py": "",
        },
    )
    unplaced = [p for p in problems(modules, LAYERS) if "in no layer" in p]
    assert unplaced == [
        f"watcher.{name} is in no layer: add `{entry}` to the row of its layer in the Layers table of "
        "ARCHITECTURE.md (this test reads the table)"
        for name, entry in [("newthing", "newthing"), ("queue", "queue"), ("queue.disk", "queue/disk")]
    ]
    assert "ARCHITECTURE.md, Layers, row '2 parts': `store/` names no module; remove it" in problems(modules, LAYERS)


def test_the_check_fails_on_the_real_package_with_one_upward_import_planted(tmp_path: Path) -> None:
    """A copy of the real package passes; the same copy with one upward import planted in a leaf (spelled as a
    package attribute, inside a function) fails with exactly that import, and so does the rule it breaks."""
    import shutil

    shutil.copytree(PKG, tmp_path / "watcher", ignore=shutil.ignore_patterns("__pycache__"))
    assert problems(read_package(tmp_path), LAYERS) == []
    errors = tmp_path / "watcher" / "errors.py"
    errors.write_text(errors.read_text("utf-8") + "\n\ndef _late():\n    from watcher import runner\n", "utf-8")
    detect = tmp_path / "watcher" / "detect" / "settle.py"
    detect.write_text(detect.read_text("utf-8") + "\nfrom ..services import http\n", "utf-8")
    planted = read_package(tmp_path)
    assert problems(planted, LAYERS) == [
        "watcher.errors (0 leaves) imports watcher.runner (4 scheduling): an import may only go to the same layer "
        "or one below (up to layer 0)"
    ]  # detect -> services stays within layer 2: only the rule below forbids it
    rules = dict(RULES)
    assert offenders(planted, "watcher.detect", rules["watcher.detect"]) == [
        "watcher.detect.settle imports watcher.services.http"
    ]
    assert offenders(planted, "watcher.errors", rules["watcher.errors"]) == ["watcher.errors imports watcher.runner"]


def test_the_docstrings_here_cite_only_files_that_exist() -> None:
    """Every file a docstring of this test names (ARCHITECTURE.md, ...) is in the checkout, so no rule it states
    points nowhere."""
    tree = ast.parse(Path(__file__).read_text("utf-8"))
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef))]
    text = " ".join(ast.get_docstring(n) or "" for n in nodes)
    cited = set(re.findall(r"[\w/]+\.(?:md|py|toml)\b", text))
    assert "ARCHITECTURE.md" in cited
    assert [name for name in sorted(cited) if not (ROOT / name).exists()] == []
