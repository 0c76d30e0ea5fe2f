"""`watcher doctor`: checks a sysadmin would otherwise do by hand, each problem printed with its fix."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any

from watcher.config import FolderConfig, Settings, reveal
from watcher.detect.fstype import decide_polling, filesystem_type, inotify_max_user_watches
from watcher.errors import NeedsUser, WatcherError

MIN_FREE_BYTES = 1 << 30
MAX_DIRS_COUNTED = 200_000


@dataclass(frozen=True)
class Finding:
    """One check: what was looked at, what was found, and how to fix it when it is a problem."""

    what: str
    detail: str
    fix: str = ""
    _: KW_ONLY
    ok: bool

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
                "folders",
                "no folder is configured",
                "add a [[folders]] table to the config, or give folders to `watcher run`",
                ok=False,
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
                "inotify watches",
                f"{native_dirs} folders to watch, limit {limit}",
                "raise it: sysctl fs.inotify.max_user_watches=524288 (and persist in /etc/sysctl.d/), "
                "or set poll = true on the largest folders",
                ok=native_dirs < limit * 0.8,
            )
        )
    return out


def _check_folder(settings: Settings, folder: FolderConfig) -> tuple[list[Finding], int]:
    """One folder's findings, and how many folders a native watch of it takes (0 when polled)."""
    path = folder.path
    what = f"folder {path}"
    if not path.is_dir():
        fix = "create it, mount the share, or fix [[folders]].path"
        return [Finding(what, "does not exist or is not a folder (an unmounted share?)", fix, ok=False)], 0
    if not os.access(path, os.R_OK | os.X_OK):
        fix = f"give the service user read access: chmod/chgrp, or setfacl -m u:$USER:rx {path}"
        return [Finding(what, "cannot be read by this user", fix, ok=False)], 0
    out = []
    needs_write = settings.sidecar.directory is None or folder.done_dir or folder.failed_dir
    if needs_write and not os.access(path, os.W_OK):
        fix = "grant write access, or set [sidecar].directory to a writable folder"
        out.append(Finding(what, "is not writable, but sidecars go beside the audio", fix, ok=False))
    fstype = filesystem_type(path)
    polled, reason = decide_polling(folder.poll, fstype)
    out.append(Finding(what, f"{fstype or 'unknown'} filesystem; {reason}", ok=True))
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
                f"{name} folder {path}",
                f"{free / 2**30:.1f} GiB free" + ("" if writable else ", not writable"),
                "free some space (at least 1 GiB) or point it elsewhere; make it writable by the service",
                ok=ok,
            )
        )
    return found


def _service_probes(settings: Settings) -> tuple[list[Finding], list[tuple[str, Any, str, str]]]:
    """Findings about the analysis backend, and (service, client, what, how to fix a refusal) for each service
    whose key a call that bills nothing can check (doctor and the daemon's start and reload use the same)."""
    from watcher.backends import choose_backend
    from watcher.services.analysis import AnalysisClient
    from watcher.services.http import HttpPolicy
    from watcher.services.neuralanalog import NeuralAnalogClient

    found: list[Finding] = []
    probes: list[tuple[str, Any, str, str]] = []
    policy = HttpPolicy(attempts=1, read_timeout=15, connect_timeout=10)
    if settings.analysis.enabled:
        try:
            which, why = choose_backend(settings.analysis)
        except WatcherError as exc:
            found.append(Finding("analysis backend", str(exc), "see the message", ok=False))
            which = ""
        if which == "local":
            found.append(Finding("analysis backend", f"local ({why})", ok=True))
        elif which == "remote":
            probes.append(
                (
                    "analysis",
                    AnalysisClient(settings.analysis.base_url, reveal(settings.analysis.api_key), policy=policy),
                    f"analysis service {settings.analysis.base_url}",
                    f"fix the key in {settings.analysis.key_source} "
                    "(analysis.api_key / api_key_file / ESSENTIA_API_KEY / the essentia_api_key credential)",
                )
            )
    if settings.archive.enabled:
        probes.append(
            (
                "processing",
                NeuralAnalogClient(settings.archive.base_url, reveal(settings.archive.api_key), policy=policy),
                f"processing service {settings.archive.base_url}",
                f"fix the key in {settings.archive.key_source} "
                "(archive.api_key / api_key_file / NEURALANALOG_API_KEY / the neuralanalog_api_key credential)",
            )
        )
    return found, probes


async def check_services(settings: Settings) -> list[Finding]:
    found, probes = _service_probes(settings)
    for _, client, what, fix in probes:
        found.append(await _probe(client, what, fix))
    return found


async def _probe(client: object, what: str, fix: str) -> Finding:
    try:
        detail = await client.check()  # type: ignore[attr-defined]
        return Finding(what, detail, ok=True)
    except WatcherError as exc:
        return Finding(what, str(exc), fix if "key" in str(exc) else "check base_url, DNS, the firewall", ok=False)
    finally:
        await client.aclose()  # type: ignore[attr-defined]


@dataclass(frozen=True)
class KeyCheck:
    """One service's key, checked by a call that bills nothing: ``refused`` is the service's refusal (the key,
    the plan, the credits), ``unchecked`` why no answer came (unreachable: not held against the key)."""

    service: str
    source: str
    refused: str | None = None
    unchecked: str | None = None


async def check_keys(settings: Settings) -> list[KeyCheck]:
    """Every paid service's key, checked side by side (what `watcher doctor` checks, without the findings). The
    clients are made in a worker thread (their TLS contexts read the CA bundle): the daemon's loop runs on."""
    _, probes = await asyncio.to_thread(_service_probes, settings)
    sources = {"analysis": settings.analysis.key_source, "processing": settings.archive.key_source}

    async def one(service: str, client: Any) -> KeyCheck:
        try:
            await client.check()
            return KeyCheck(service, sources[service])
        except NeedsUser as exc:
            return KeyCheck(service, sources[service], refused=str(exc))
        except WatcherError as exc:
            return KeyCheck(service, sources[service], unchecked=str(exc))
        finally:
            await client.aclose()

    return list(await asyncio.gather(*(one(service, client) for service, client, _, _ in probes)))


def check_store(settings: Settings) -> list[Finding]:
    """The store is reachable (a shared one), and every folder's marker names it (else: how to take it over)."""
    from watcher import markers

    out: list[Finding] = []
    mine: str | None = None
    if settings.store.url:
        from watcher.store.postgres import PostgresStore, redact

        where = redact(settings.store.url)
        try:
            passfile = str(settings.store.passfile) if settings.store.passfile else None
            store = PostgresStore(settings.store.url, passfile=passfile, readonly=True)
        except Exception as exc:  # any driver error: reported, never raised
            if type(exc).__name__ == "UndefinedTable":  # reached, and empty: the first daemon creates the tables
                return [Finding("store", f"PostgreSQL {where}: reachable, no tables yet (the first daemon makes them)",
                                ok=True)]  # fmt: skip
            return [Finding("store", f"{where}: {exc}", "check [store] url, the passfile and pg_hba.conf", ok=False)]
        try:
            mine = store.store_id
            nodes = store.nodes()
        finally:
            store.close()
        alive = ", ".join(n["name"] for n in nodes) or "none yet"
        out.append(
            Finding("store", f"PostgreSQL {where}; this node is {settings.store.node_name}; nodes: {alive}", ok=True)
        )
    else:
        with contextlib.suppress(OSError):
            mine = (settings.state_dir / markers.STORE_ID_FILE).read_text(encoding="utf-8").strip() or None
    for folder in settings.folders:
        marker = markers.read_marker(folder.path) if folder.path.is_dir() else None
        if marker is None or (mine is not None and marker.get("store") == mine):
            continue
        out.append(
            Finding(
                f"folder {folder.path}",
                f"owned by another store ({marker.get('store')}): its {markers.MARKER} names it, so this daemon "
                "leaves the folder alone",
                f"if the other store's daemons should keep it, point [store] url at their store (several machines) "
                f"or drop the folder from this config; to take it over deliberately, stop them and run "
                f"`watcher adopt {folder.path}`",
                ok=False,
            )
        )
    return out


def run_doctor(settings: Settings, config_path: Path | None) -> list[Finding]:
    """Every check, in the order a person would make them."""
    found = [Finding("configuration", f"valid ({config_path or 'no file: defaults and environment'})", ok=True)]
    found += check_folders(settings)
    found += check_store(settings)
    found += check_space(settings)
    found += asyncio.run(check_services(settings))
    return found
