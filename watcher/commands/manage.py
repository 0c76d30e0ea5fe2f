"""The commands that change what is due: retry, resume a service, pause or resume a folder, adopt a folder."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from watcher.app import open_store as open_adapter
from watcher.app import store_path
from watcher.commands.common import absolute, open_store
from watcher.config import Settings
from watcher.errors import ConfigError
from watcher.store import Store


def retry(settings: Settings, paths: Sequence[Path], *, failed: bool = False, in_doubt: bool = False) -> int:
    """`watcher retry`: make failed, waiting or held jobs due now (see Store.retry); how many were reset.
    ``failed`` also takes the files waiting on a paused service (a refused key, no credits)."""
    if not paths and not failed and not in_doubt:
        raise ConfigError("say what to retry: PATH..., --failed or --in-doubt")
    store = open_store(settings)
    try:
        selected: list[str] | None = None
        if paths:
            targets = [str(p) for p in absolute(paths)]
            selected = [j.file.path for j in store.jobs_under(targets)]
        return store.retry(paths=selected, failed=failed, in_doubt=in_doubt, waiting_on_service=failed)
    finally:
        store.close()


def resume_service(settings: Settings, pipelines: Sequence[str]) -> int:
    """Make the jobs of ``pipelines`` that wait on their paused service due now (its key was fixed)."""
    store = open_store(settings)
    try:
        return store.retry(paths=None, waiting_on_service=True, pipelines=list(pipelines))
    finally:
        store.close()


def pause(settings: Settings, folder: Path, *, paused: bool) -> str:
    """`watcher pause` / `resume`: kept in the store; returns the folder as recorded. Pausing a folder that is
    not configured is refused (it would stay in `watcher status` for good); resuming one is allowed, to clear it."""
    path = str(absolute([folder])[0])
    configured = [str(f.path) for f in settings.folders]
    store = open_store(settings) if settings.store.url else Store(store_path(settings))
    try:
        if path not in configured and (paused or path not in store.paused_folders()):
            shown = ", ".join(configured) or "none"
            raise ConfigError(f"{path} is not a configured folder (configured: {shown}); nothing was changed")
        store.set_paused(path, paused=paused)
    finally:
        store.close()
    return path


def adopt(settings: Settings, folder: Path) -> tuple[str, str | None, str]:
    """`watcher adopt`: make this store the owner of ``folder``'s marker; (folder, previous owner, our store)."""
    from watcher import markers

    path = Path(os.path.abspath(folder.expanduser()))
    if not path.is_dir():
        raise ConfigError(f"{path} is not a folder")
    store = open_adapter(settings)
    try:
        mine = markers.store_id(store, settings.state_dir)
    finally:
        store.close()
    before = markers.read_marker(path)
    markers.adopt(path, mine, settings.store.node_name)
    return str(path), None if before is None else str(before.get("store")), mine
