"""Delivery: fetch the versions' zips (or single objects), extract them safely, and move the folder into place.

Layout: ``<output_dir>/<path inside the watched folder, without extension>/`` holding the track versions,
stems under ``stems/<version>/``, and ``manifest.json``. Everything is assembled in a temp folder inside
the output folder and renamed into place. A newer revision of the same source never overwrites an older
delivery: the older folder is renamed to ``<name>.replaced-<UTC time>`` first, and the log says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import os
import re
import shutil
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import structlog

from watcher import __version__
from watcher.audiofile import sha256_of
from watcher.config import ArchiveConfig
from watcher.errors import ExpiredURL, RetryLater
from watcher.fsutil import (
    free_name,
    fsync_dir,
    publish_tree,
    read_json_object,
    safe_component,
    temp_prefix,
    write_json_atomic,
)
from watcher.names import display
from watcher.safezip import FLOOR, ExtractedArchive, SizeBound, extract_zip, size_bound
from watcher.store import Job, LeaseLost
from watcher.versions import STEM_VERSIONS, TRACK_VERSIONS, VERSIONS

log = structlog.get_logger("watcher.deliver")
AUDIO_SUFFIXES = {"wav", "wave", "flac", "mp3", "m4a", "aif", "aiff", "ogg"}
ARCHIVE_TRIES = 3
# Stems per documented preset; a preset not listed here may hold up to UNKNOWN_PRESET_STEMS.
PRESET_STEMS = {"2_tracks": 2, "4_tracks": 4, "6_tracks": 6, "acapella": 1, "instrumental": 1}
UNKNOWN_PRESET_STEMS = 8
VERSION_WORDS = {
    "restored": ("restored", "upscaled", "restoration"),
    "mastered": ("mastered", "master"),
    "original": ("original",),
}


class Offer(Protocol):
    @property
    def download_url(self) -> str | None: ...

    @property
    def email_notification_queued(self) -> bool: ...

    @property
    def archive_incomplete(self) -> bool: ...


class Downloads(Protocol):
    """What delivery needs from the processing service."""

    async def request_archive(
        self,
        *,
        versions: Sequence[str],
        audio_id: str | None = None,
        ids: Sequence[str] | None = None,
        format: str = "wav",
        formats: Mapping[str, str] | None = None,
        stem_ids: Sequence[str] | None = None,
        stem_selections: Sequence[Mapping[str, Any]] | None = None,
    ) -> Offer: ...

    async def download_archive(self, url: str, dest: Path, *, max_bytes: int | None = None) -> int: ...

    async def download_object(
        self, kind: str, object_id: str, dest: Path, *, format: str, max_bytes: int | None = None
    ) -> int: ...

    async def stem_objects(self, creation_id: str) -> list[tuple[str, str]]:
        """The (stem_id, name) pairs of a finished stem split, for fetching stems one by one."""
        ...


def attribute(rel: str, candidates: Sequence[str]) -> str | None:
    """Which requested version a file in a zip belongs to, from its path; None when it cannot be told.

    Files that are not audio (a README the service adds) belong to no version: they are ``info``.
    """
    if Path(rel).suffix.lower().lstrip(".") not in AUDIO_SUFFIXES:
        return "info"
    if len(candidates) == 1:
        return candidates[0]
    words = set(re.split(r"[^a-z0-9]+", rel.lower()))
    found = []
    for version in candidates:
        base = version.removesuffix("_stems")
        if words & set(VERSION_WORDS.get(base, (base,))):
            found.append(version)
    return found[0] if len(found) == 1 else None


Placing = Callable[[], AbstractAsyncContextManager[bool]]


@contextlib.asynccontextmanager
async def _always() -> AsyncIterator[bool]:
    yield True


class Deliverer:
    """Turns finished remote versions into one verified delivery folder per revision."""

    def __init__(self, downloads: Downloads, cfg: ArchiveConfig, output_for: Callable[[Job], Path | None]) -> None:
        self.downloads = downloads
        self.cfg = cfg
        self.output_for = output_for

    def bound(self, job: Job, versions: Sequence[str]) -> SizeBound:
        """What the source (``job.data["duration"]``, ``["channels"]``) justifies for ``versions``' files.

        Track versions are one file each, a stem version the preset's stem count. Unknown duration: the
        configured ``max_archive_bytes``, and the log says so.
        """
        duration = job.data.get("duration")
        channels = job.data.get("channels")
        preset = str(self.cfg.stems.get("preset", ""))
        stems = PRESET_STEMS.get(preset, UNKNOWN_PRESET_STEMS)
        files = sum(1 if v in TRACK_VERSIONS else stems for v in versions)
        if not isinstance(duration, int | float) or isinstance(duration, bool) or duration < 0:
            log.info(
                "deliver.size_unbounded",
                path=display(job.file.path),
                reason="the source's duration is unknown",
                limit=self.cfg.max_archive_bytes,
                next="downloads and zips are capped by max_archive_bytes only",
            )
            duration = None
        if not isinstance(channels, int) or isinstance(channels, bool) or channels <= 0:
            channels = None
        return size_bound(duration, channels, files, self.cfg.max_archive_bytes)

    def target(self, job: Job) -> Path:
        out = self.output_for(job)
        if out is None:
            raise RetryLater("no output folder is configured for this file's folder")
        rel = Path(job.file.rel_path)
        return out / rel.parent / rel.stem

    async def deliver(
        self, job: Job, versions: Sequence[str], ids: Mapping[str, str], *, placing: Placing = _always
    ) -> Path:
        """Fetch, verify and place ``versions``; returns the delivery folder. Idempotent per revision.

        ``placing`` is held while the staged folder is renamed into place and says whether the job may still
        place it (live, its revision still the one on disk); if not, nothing in the output folder is touched
        (LeaseLost): a superseded job's late download never replaces the newer revision's delivery."""
        target = self.target(job)
        sha256 = job.data["sha256"]
        existing = await asyncio.to_thread(_manifest, target)
        if (
            existing
            and existing.get("source", {}).get("sha256") == sha256
            and set(versions) <= set(existing.get("versions", []))
        ):
            log.info("deliver.already_there", path=display(job.file.path), delivery=display(target))
            return target
        staging = target.parent / f"{temp_prefix()}{job.id}-{target.name}"
        await asyncio.to_thread(_fresh_staging, staging)
        try:
            files: list[dict[str, Any]] = []
            tracks = [v for v in versions if v in TRACK_VERSIONS]
            stems = [v for v in versions if v in STEM_VERSIONS]
            if tracks:
                files += await self._fetch_group(job, tracks, ids, staging, staging, stems=False)
            if stems:
                files += await self._fetch_group(job, stems, ids, staging, staging / "stems", stems=True)
            manifest = _delivery_manifest(job, files, ids)
            await asyncio.to_thread(write_json_atomic, staging / "manifest.json", manifest)
            async with placing() as may_place:
                if not may_place:
                    raise LeaseLost(
                        f"job {job.id} (archive) was superseded or lost its lease while downloading; its delivery "
                        "is dropped and the output folder left as it is"
                    )
                await asyncio.to_thread(self._place, staging, target, job)
        except OSError as exc:
            await asyncio.to_thread(shutil.rmtree, staging, True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise RetryLater(
                    f"the output folder {display(target.parent)} is full ({exc.strerror}); nothing of this delivery "
                    "was kept, it is tried again later"
                ) from exc
            raise
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, staging, True)
            raise
        log.info("deliver.done", path=display(job.file.path), delivery=display(target), files=len(files))
        return target

    async def _fetch_group(
        self, job: Job, versions: list[str], ids: Mapping[str, str], staging: Path, dest: Path, *, stems: bool
    ) -> list[dict[str, Any]]:
        """One archive request for a group (tracks or stems), then single downloads for whatever it lacked."""
        bound = self.bound(job, versions)
        offer, got = await self._fetch_zip(job, versions, ids, staging, dest, bound, stems=stems)
        if offer.email_notification_queued or offer.archive_incomplete or not offer.download_url:
            why = "queued for e-mail" if offer.email_notification_queued else "incomplete"
            log.warning(
                "deliver.fetching_singly",
                path=display(job.file.path),
                archive=why,
                next="fetching what the archive lacks one object at a time",
            )
            for version in versions:
                have = {Path(f["path"]).stem for f in got.get(version, [])}
                if version in TRACK_VERSIONS and have:
                    continue
                got.setdefault(version, []).extend(
                    await self._fetch_single(job, version, ids, staging, dest, have, bound)
                )
        return [f for records in got.values() for f in records]

    async def _fetch_zip(
        self,
        job: Job,
        versions: list[str],
        ids: Mapping[str, str],
        staging: Path,
        dest: Path,
        bound: SizeBound,
        *,
        stems: bool,
    ) -> tuple[Offer, dict[str, list[dict[str, Any]]]]:
        """Ask for the group's zip, download and extract it into the staging folder (a fresh URL when one
        expired, up to ARCHIVE_TRIES); the offer, and the files it held per version."""
        formats = {f"{v}_format": self.cfg.format_of(v) for v in versions if v in TRACK_VERSIONS}
        zip_path = staging.parent / f"{temp_prefix()}{job.id}-{'stems' if stems else 'tracks'}.zip"
        for attempt in range(1, ARCHIVE_TRIES + 1):
            offer = await self.downloads.request_archive(
                audio_id=ids["audio"], versions=versions, format=self.cfg.format, formats=formats
            )
            if not offer.download_url:
                return offer, {}
            try:
                # A zip of audio hardly compresses: its own size is bounded like its contents, plus headers.
                await self.downloads.download_archive(
                    offer.download_url, zip_path, max_bytes=min(bound.total + FLOOR, self.cfg.max_archive_bytes)
                )
                extracted = await asyncio.to_thread(
                    extract_zip,
                    zip_path,
                    staging,
                    max_total_bytes=self.cfg.max_archive_bytes,
                    max_entries=self.cfg.max_archive_entries,
                    bound=bound,
                )
            except ExpiredURL:
                if attempt == ARCHIVE_TRIES:
                    raise
                log.info("deliver.url_expired", path=display(job.file.path), next="asking for a fresh archive URL")
                continue
            finally:
                with contextlib.suppress(FileNotFoundError):
                    zip_path.unlink()
            return offer, await asyncio.to_thread(self._settle, extracted, versions, dest, staging, ids, stems=stems)
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _settle(
        self,
        extracted: ExtractedArchive,
        versions: list[str],
        dest: Path,
        staging: Path,
        ids: Mapping[str, str],
        *,
        stems: bool,
    ) -> dict[str, list[dict[str, Any]]]:
        """In a worker thread: move each extracted entry to its place in the staging folder, and record it."""
        got: dict[str, list[dict[str, Any]]] = {}
        for index, entry in enumerate(extracted.files, 1):
            version = attribute(entry.path, versions) or "unknown"
            where = self._place_for(dest, entry.path, version, index, stems=stems)
            os.replace(extracted.root / entry.path, where)
            got.setdefault(version, []).append(self._record(where, staging, version, ids, entry.sha256))
        shutil.rmtree(extracted.root, ignore_errors=True)
        return got

    async def _fetch_single(
        self,
        job: Job,
        version: str,
        ids: Mapping[str, str],
        staging: Path,
        dest: Path,
        have: set[str],
        bound: SizeBound,
    ) -> list[dict[str, Any]]:
        """Download one version (a track, or the stems not in ``have``) with ``GET /download/{type}/{id}``."""
        stem = Path(job.file.rel_path).stem
        wanted = VERSIONS[version]
        if wanted.track:
            fmt = self.cfg.format_of(version)
            where = dest / f"{stem}.{version}.{fmt}"
            await self.downloads.download_object(
                wanted.object_type, ids[wanted.product], where, format=fmt, max_bytes=bound.per_file
            )
            return [await asyncio.to_thread(self._record, where, staging, version, ids, None)]
        creation = ids[wanted.product]
        records = []
        for index, (stem_id, raw) in enumerate(await self.downloads.stem_objects(creation), 1):
            name = safe_component(raw, f"{version}-{index}")
            if name in have:
                continue
            where = free_name(dest / version / f"{name}.{self.cfg.format}")
            where.parent.mkdir(parents=True, exist_ok=True)
            await self.downloads.download_object(
                "stem", stem_id, where, format=self.cfg.format, max_bytes=bound.per_file
            )
            records.append(await asyncio.to_thread(self._record, where, staging, version, ids, None))
        return records

    @staticmethod
    def _place_for(dest: Path, rel: str, version: str, index: int, *, stems: bool) -> Path:
        """Where a zip entry goes: its base name made safe, stems in a folder per version; never a clash."""
        name = safe_component(PurePosixPath(rel).name, f"{version}-{index}")
        folder = dest / version if stems and version in STEM_VERSIONS else dest
        folder.mkdir(parents=True, exist_ok=True)
        return free_name(folder / name)

    def _record(
        self, path: Path, staging: Path, version: str, ids: Mapping[str, str], sha: str | None
    ) -> dict[str, Any]:
        product = VERSIONS[version].product if version in VERSIONS else "audio"
        return {
            "path": path.relative_to(staging).as_posix(),
            "version": version,
            "format": path.suffix.lstrip(".").lower(),
            "size": path.stat().st_size,
            "sha256": sha or sha256_of(path)[1],
            "service_ids": {"audio_id": ids.get("audio"), "job_id": ids.get(product) if product != "audio" else None},
        }

    def _place(self, staging: Path, target: Path, job: Job) -> None:
        """Rename the staged folder into place, keeping an older delivery of other content beside it."""
        if target.exists():
            stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
            kept = target.with_name(f"{target.name}.replaced-{stamp}")
            os.rename(target, kept)
            log.warning(
                "deliver.previous_kept",
                path=display(job.file.path),
                delivery=display(target),
                previous=display(kept),
                reason="a newer revision of this source was delivered",
            )
        publish_tree(staging)
        os.rename(staging, target)
        fsync_dir(target.parent)


def _fresh_staging(staging: Path) -> None:
    """An empty staging folder, private until it is renamed into place (a leftover of a kill is replaced)."""
    staging.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(mode=0o700)


def _manifest(folder: Path) -> dict[str, Any] | None:
    return read_json_object(folder / "manifest.json")


def _delivery_manifest(job: Job, files: list[dict[str, Any]], ids: Mapping[str, str]) -> dict[str, Any]:
    """The manifest.json of a delivery: its source file, the versions and files delivered, the service's ids."""
    return {
        "source": {
            "path": display(job.file.path),
            "name": display(Path(job.file.path).name),
            "sha256": job.data["sha256"],
            "size": job.file.size,
        },
        "versions": sorted({f["version"] for f in files} - {"info", "unknown"}),
        "files": files,
        "ids": dict(ids),
        "delivered_at": dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z"),
        "watcher_version": __version__,
    }
