"""What every command needs: the store of these settings, and paths as the store records them."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from watcher.app import open_store as open_adapter
from watcher.app import store_path
from watcher.config import Settings
from watcher.errors import ConfigError
from watcher.store import Store
from watcher.store.ports import StorePort


def open_store(settings: Settings) -> StorePort:
    """The store of a watcher that has run with these settings (ConfigError when there is none yet)."""
    if settings.store.url:
        return open_adapter(settings)
    path = store_path(settings)
    if not path.exists():
        raise ConfigError(f"no store at {path} yet: watcher has not run with state_dir = {settings.state_dir}")
    return Store(path)


def under(path: str, targets: Sequence[str]) -> bool:
    """True when ``path`` is one of ``targets`` or inside one of them."""
    return any(Path(path).is_relative_to(t) for t in targets)


def absolute(paths: Sequence[Path]) -> list[Path]:
    """The paths as the store records them: ``~`` expanded, made absolute against the working folder (never
    resolved). Every command calls this first, so `watcher scan .` means the folder it runs in."""
    return [Path(os.path.abspath(p.expanduser())) for p in paths]
