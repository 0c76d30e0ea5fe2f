"""Keyword-only flags: no function of the package takes a boolean positionally, so no call reads as
`hint(path, True, False)`. Today's exceptions are listed, each with its reason."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "watcher"

# Functions (path:name) allowed to take a positional boolean, each with its reason.
ALLOWED: dict[str, str] = {}


def positional_flags(package: Path) -> set[str]:
    """Every function (path:name) with a parameter annotated ``bool`` (or ``bool | None``) that may be passed
    by position."""
    found: set[str] = set()
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent).as_posix()
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                for arg in node.args.posonlyargs + node.args.args:
                    if arg.annotation is not None and ast.unparse(arg.annotation) in ("bool", "bool | None"):
                        found.add(f"{rel}:{node.name}")
    return found


def test_no_function_takes_a_flag_by_position_unless_listed() -> None:
    """Every boolean parameter is keyword-only (after ``*``), but for the listed exceptions."""
    new = sorted(positional_flags(PKG) - set(ALLOWED))
    assert new == [], "make these flags keyword-only (after `*`) and pass them by name: " + ", ".join(new)


def test_a_positional_flag_is_found_and_a_keyword_only_one_is_not(tmp_path: Path) -> None:
    """The check sees a positional ``bool`` (in a method too) and passes one after ``*``."""
    pkg = tmp_path / "watcher"
    pkg.mkdir()
    (pkg / "m.py").write_text(
        "def bad(path: str, is_dir: bool) -> None: ...\n"
        "def good(path: str, *, is_dir: bool) -> None: ...\n"
        "class C:\n    def worse(self, x: bool | None = None) -> None: ...\n",
        "utf-8",
    )
    assert positional_flags(pkg) == {"watcher/m.py:bad", "watcher/m.py:worse"}


def keyword_flags(package: Path, names: set[str]) -> dict[str, set[str]]:
    """The keyword-only ``bool`` parameters of every function (path:name) called one of ``names``."""
    found: dict[str, set[str]] = {}
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent).as_posix()
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name in names:
                flags = {a.arg for a in node.args.kwonlyargs if a.annotation and ast.unparse(a.annotation) == "bool"}
                found[f"{rel}:{node.name}"] = flags
    return found


def test_every_hint_takes_its_flags_by_name():
    """The hints the issue cited (`hint(path, True, False)`) are among the functions checked: the detector's, the
    settler's and the observers' (``HintFn``) take ``is_dir``, ``closed`` and ``live`` after ``*`` only."""
    found = keyword_flags(PKG, {"hint", "_hint", "hint_threadsafe", "__call__"})
    assert found["watcher/detect/detector.py:hint"] == {"is_dir", "closed", "live"}
    assert found["watcher/detect/detector.py:hint_threadsafe"] == {"is_dir", "closed"}
    assert found["watcher/detect/settle.py:hint"] == {"closed", "live"}
    assert found["watcher/detect/poll.py:__call__"] == {"is_dir", "closed"}
    assert not {f for f in positional_flags(PKG) if f.endswith(("hint", "__call__"))}
