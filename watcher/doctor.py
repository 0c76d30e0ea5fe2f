"""`watcher doctor`: checks a sysadmin would otherwise do by hand, each problem printed with its fix."""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watcher.config import FolderConfig, Settings, reveal
from watcher.detect.fstype import decide_polling, filesystem_type, inotify_max_user_watches
from watcher.errors import WatcherError

MIN_FREE_BYTES = 1 << 30
MAX_DIRS_COUNTED = 200_000


@dataclass(frozen=True)
class Finding:
    """One check: what was looked at, what was found, and how to fix it when it is a problem."""

    ok: bool
    what: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        mark = "ok  " if self.ok else "FAIL"
        text = f"[{mark}] {self.what}: {self.detail}"
        return text + (f"\n       fix: {self.fix}" if self.fix and not self.ok else "")


def _count_dirs(root: Path) -> int:
    count = 0
    for _, dirs, _ in os.walk(root):
        count += len(dirs)
        if count > MAX_DIRS_COUNTED:
            break
    return count + 1


def check_folders(settings: Settings) -> list[Finding]:
    """Each folder: there, readable, writable where it must be, its filesystem; then inotify's watch limit."""
    if not settings.folders:
        return [
            Finding(
                False,
                "folders",
                "no folder is configured",
                "add a [[folders]] table to the config, or give folders to `watcher run`",
            )
        ]
    out: list[Finding] = []
    native_dirs = 0
    for folder in settings.folders:
        found, dirs = _check_folder(settings, folder)
        out += found
        native_dirs += dirs
    limit = inotify_max_user_watches()
    if native_dirs and limit is not None:
        out.append(
            Finding(
                native_dirs < limit * 0.8,
                "inotify watches",
                f"{native_dirs} folders to watch, limit {limit}",
                "raise it: sysctl fs.inotify.max_user_watches=524288 (and persist in /etc/sysctl.d/), "
                "or set poll = true on the largest folders",
            )
        )
    return out


def _check_folder(settings: Settings, folder: FolderConfig) -> tuple[list[Finding], int]:
    """One folder's findings, and how many folders a native watch of it takes (0 when polled)."""
    path = folder.path
    what = f"folder {path}"
    if not path.is_dir():
        fix = "create it, mount the share, or fix [[folders]].path"
        return [Finding(False, what, "does not exist or is not a folder (an unmounted share?)", fix)], 0
    if not os.access(path, os.R_OK | os.X_OK):
        fix = f"give the service user read access: chmod/chgrp, or setfacl -m u:$USER:rx {path}"
        return [Finding(False, what, "cannot be read by this user", fix)], 0
    out = []
    needs_write = settings.sidecar.directory is None or folder.done_dir or folder.failed_dir
    if needs_write and not os.access(path, os.W_OK):
        fix = "grant write access, or set [sidecar].directory to a writable folder"
        out.append(Finding(False, what, "is not writable, but sidecars go beside the audio", fix))
    fstype = filesystem_type(path)
    polled, reason = decide_polling(folder.poll, fstype)
    out.append(Finding(True, what, f"{fstype or 'unknown'} filesystem; {reason}"))
    return out, (_count_dirs(path) if not polled and folder.recursive else 0)


def check_space(settings: Settings) -> list[Finding]:
    places = {"state": settings.state_dir}
    outs = [settings.archive.output_dir, *(f.output_dir for f in settings.folders)] if settings.archive.enabled else []
    for out in outs:
        if out is not None:
            places[f"output {out}"] = out
    found = []
    for name, path in places.items():
        probe = path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        writable = os.access(probe, os.W_OK)
        ok = free >= MIN_FREE_BYTES and writable
        found.append(
            Finding(
                ok,
                f"{name} folder {path}",
                f"{free / 2**30:.1f} GiB free" + ("" if writable else ", not writable"),
                "free some space (at least 1 GiB) or point it elsewhere; make it writable by the service",
            )
        )
    return found


async def check_services(settings: Settings) -> list[Finding]:
    from watcher.analyzers import choose_backend
    from watcher.services.analysis import AnalysisClient
    from watcher.services.http import HttpPolicy
    from watcher.services.neuralanalog import NeuralAnalogClient

    found: list[Finding] = []
    probes: list[tuple[Any, str, str]] = []  # (client, what, how to fix a refusal)
    policy = HttpPolicy(attempts=1, read_timeout=15, connect_timeout=10)
    if settings.analysis.enabled:
        try:
            which, why = choose_backend(settings.analysis)
        except WatcherError as exc:
            found.append(Finding(False, "analysis backend", str(exc), "see the message"))
            which = ""
        if which == "local":
            found.append(Finding(True, "analysis backend", f"local ({why})"))
        elif which == "remote":
            probes.append(
                (
                    AnalysisClient(settings.analysis.base_url, reveal(settings.analysis.api_key), policy=policy),
                    f"analysis service {settings.analysis.base_url}",
                    "check analysis.api_key / ESSENTIA_API_KEY / the essentia_api_key credential",
                )
            )
    if settings.archive.enabled:
        probes.append(
            (
                NeuralAnalogClient(settings.archive.base_url, reveal(settings.archive.api_key), policy=policy),
                f"processing service {settings.archive.base_url}",
                "check archive.api_key / NEURALANALOG_API_KEY / the neuralanalog_api_key credential",
            )
        )
    for client, what, fix in probes:
        found.append(await _probe(client, what, fix))
    return found


async def _probe(client: object, what: str, fix: str) -> Finding:
    try:
        detail = await client.check()  # type: ignore[attr-defined]
        return Finding(True, what, detail)
    except WatcherError as exc:
        return Finding(False, what, str(exc), fix if "key" in str(exc) else "check base_url, DNS, the firewall")
    finally:
        await client.aclose()  # type: ignore[attr-defined]


def run_doctor(settings: Settings, config_path: Path | None) -> list[Finding]:
    """Every check, in the order a person would make them."""
    found = [Finding(True, "configuration", f"valid ({config_path or 'no file: defaults and environment'})")]
    found += check_folders(settings)
    found += check_space(settings)
    found += asyncio.run(check_services(settings))
    return found
