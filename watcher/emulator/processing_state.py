"""The emulated processing service's state: the objects it holds (uploads, processed versions, stem splits),
the signed URLs it handed out, the faults switched on, and the rules of when a job is done or failed.

The routes (watcher.emulator.neuralanalog) read and change this; the artifacts (the processed audio and the
zips) come from watcher.emulator.audio_processing.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KIND_OF_VERSION = {"original": "audio", "restored": "upscaled", "mastered": "mastered"}
JOB_ROUTES = {"upscaled": "POST /upscale-audio", "mastered": "POST /master-audio", "stem_split": "POST /create-stems"}
OPERATION_OF_KIND = {"upscaled": "restore", "mastered": "master", "stem_split": "stems"}  # as billed
PAID_ROUTES = ("POST /from-file", *JOB_ROUTES.values())
HOSTILE_STEM_NAMES = ("../../escape", "/abs/evil", "a/b", "..", "")  # hostile_stem_names serves these
SOURCE_FIELDS = ("stem_id", "mastered_id", "upscaled_id", "audio_id")  # most specific first


@dataclass
class ProcessingFaults:
    """Faults for the next requests; counters go down as requests meet them. Route names as in counts().

    Routes: ``POST /from-file``, ``GET /status``, ``POST /upscale-audio``, ``POST /master-audio``,
    ``POST /create-stems``, ``POST /download-archive``, ``GET /download``; ``"*"`` matches any of them.
    """

    status_429: dict[str, int] = field(default_factory=dict)  # route -> how many 429s (with Retry-After)
    retry_after: float = 0.2
    status_500: dict[str, int] = field(default_factory=dict)
    fail_with: dict[str, list[int]] = field(default_factory=dict)  # route -> statuses to answer, in order
    lose_answer: dict[str, int] = field(default_factory=dict)  # do the work, then drop without answering
    drop_upload_after: int | None = None  # read this many body bytes of the next upload, then hang up
    failed_kinds: set[str] = field(default_factory=set)  # audio, upscaled, mastered, stem_split -> is_failed
    polls_needed: int = 1  # status polls answered "in progress" before a job completes
    polls_by_kind: dict[str, int] = field(default_factory=dict)  # per-kind override of polls_needed
    complete_after: float | None = None  # seconds after which a job completes even if nobody polled it
    email_queued: int = 0  # archive requests answered with email_notification_queued and no URL
    archive_incomplete: int = 0  # archive zips missing one requested file, flagged archive_incomplete
    expired_urls: int = 0  # storage GETs refused as for an expired signature
    expired_status: int = 403  # ... with this status (403, 404, 410)
    url_ttl: float | None = None  # seconds a signed URL stays valid (0: expired at once); None: forever
    storage_500: int = 0  # storage GETs answered 500
    truncate_downloads: int = 0  # storage GETs that send half the body, then drop the connection
    zip_attack: str | None = None  # one of audio_processing.ATTACKS
    zip_bomb_bytes: int = 64 << 20  # uncompressed size of the "oversized" entry
    no_id: dict[str, int] = field(default_factory=dict)  # route -> 200 {"status": "ok"} without the ID, no work
    done_without_id: dict[str, int] = field(default_factory=dict)  # route -> the work done (billed), 200 without ID
    done_then_303: dict[str, int] = field(default_factory=dict)  # route -> the work done (billed), then a 303
    malformed_status: int = 0  # GET /status answers that are 200 with a body that is not JSON
    hostile_stem_names: bool = False  # stem names in status_details become HOSTILE_STEM_NAMES
    redirect_to: str | None = None  # every GET /download answers 307 with this Location
    not_ready_archive: int = 0  # POST /download-archive answers 409 "archive not ready yet"
    reject_uploads: set[str] = field(default_factory=set)  # uploads whose file name contains one of these: 422
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def take(self, table: dict[str, int], route: str) -> bool:
        with self.lock:
            for key in (route, "*"):
                if table.get(key, 0) > 0:
                    table[key] -= 1
                    return True
            return False

    def take_count(self, name: str) -> bool:
        with self.lock:
            if getattr(self, name) > 0:
                setattr(self, name, getattr(self, name) - 1)
                return True
            return False

    def next_status(self, route: str) -> int | None:
        with self.lock:
            for key in (route, "*"):
                if self.fail_with.get(key):
                    return self.fail_with[key].pop(0)
            return None


@dataclass
class Obj:
    """One object the service holds: an upload, a processed version, a stem split or one stem."""

    kind: str  # audio, upscaled, mastered, stem_split, stem
    path: Path  # the file (for stem_split, the folder of stems)
    name: str  # the uploaded file's name (for a stem, the stem's name)
    audio_id: str
    polls: int = 0  # status polls seen
    waited: int = 0  # of those, answered "in progress"
    sha256: str = ""
    size: int = 0
    params: dict[str, Any] = field(default_factory=dict)  # the request body that created it
    stems: list[tuple[str, str]] = field(default_factory=list)  # stem_split: (stem_id, name)
    stems_from: str = ""  # stem_split: the kind of object it split
    parent: str = ""  # stem: its stem_split's ID
    failed: str | None = None  # error message once the job is known to fail
    seconds: float | None = None  # audio: the seconds its headers give (what the bill charges for it)
    created: float = field(default_factory=time.monotonic)


class ProcessingState:
    """Objects, signed URLs and faults of one emulated service; thread-safe through ``lock``."""

    def __init__(self) -> None:
        self.faults = ProcessingFaults()
        self.objects: dict[str, Obj] = {}
        self.signed: dict[str, tuple[Path, float | None]] = {}
        self.workdir = Path(tempfile.mkdtemp(prefix="watcher-emulator-"))
        self.lock = threading.Lock()

    def reset(self) -> None:
        """Forget every object, signed URL and fault."""
        with self.lock:
            self.faults = ProcessingFaults()
            self.objects.clear()
            self.signed.clear()
        for child in self.workdir.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    def new_id(self) -> str:
        return secrets.token_hex(8)

    def sign(self, path: Path, storage_url: str) -> str:
        token = secrets.token_hex(12)
        ttl = self.faults.url_ttl
        with self.lock:
            self.signed[token] = (path, None if ttl is None else time.monotonic() + ttl)
        return f"{storage_url}/signed/{token}"

    def done(self, obj: Obj) -> bool:
        """Whether the job has finished (completed or failed); stems finish with their split."""
        if obj.kind == "stem":
            return self.done(self.objects[obj.parent])
        after = self.faults.complete_after
        if after is not None and time.monotonic() - obj.created >= after:
            return True  # a real service finishes work whether or not anyone asks about it
        return obj.waited >= self.faults.polls_by_kind.get(obj.kind, self.faults.polls_needed)

    def error(self, obj: Obj) -> str | None:
        if obj.kind == "stem":
            return self.error(self.objects[obj.parent])
        if obj.failed is None and obj.kind in self.faults.failed_kinds:
            return f"emulated failure of {obj.kind}"
        return obj.failed

    def archive_problem(self, versions: list[str], ids: list[str]) -> str | None:
        """Why an archive request is refused (422), or None."""
        if not versions or not ids:
            return "versions and id (or ids) are required"
        tracks = [v for v in versions if v in KIND_OF_VERSION]
        stems = [v for v in versions if v.removesuffix("_stems") in KIND_OF_VERSION and v.endswith("_stems")]
        if len(tracks) + len(stems) != len(versions):
            return f"versions: unknown value in {versions}"
        if tracks and stems:
            return "track versions and stem versions are separate requests"
        for audio_id in ids:
            if audio_id not in self.objects or self.objects[audio_id].kind != "audio":
                return f"unknown audio id {audio_id}"
            for version in versions:
                obj = self.source_of(version, audio_id)
                if obj is None or not self.done(obj) or self.error(obj):
                    return f"{version} of {audio_id} is not complete"
        return None

    def source_of(self, version: str, audio_id: str) -> Obj | None:
        if version == "original":
            return self.objects[audio_id]
        if version in KIND_OF_VERSION:
            return self.latest(KIND_OF_VERSION[version], audio_id)
        kind = KIND_OF_VERSION[version.removesuffix("_stems")]
        found = [o for o in self.objects.values() if o.kind == "stem_split" and o.audio_id == audio_id]
        found = [o for o in found if o.stems_from == kind]
        return found[-1] if found else None

    def entries(self, audio_id: str, versions: list[str]) -> list[tuple[str, Path]]:
        """(name in the zip, file) for each requested version; stems in a folder per version."""
        stem = Path(self.objects[audio_id].name).stem
        out: list[tuple[str, Path]] = []
        for version in versions:
            obj = self.source_of(version, audio_id)
            assert obj is not None
            if version in KIND_OF_VERSION:
                out.append((f"{stem} ({version}).wav", obj.path))
            else:
                out += [(f"{version}/{name}.wav", obj.path / f"{name}.wav") for _, name in obj.stems]
        return out

    def latest(self, kind: str, audio_id: str) -> Obj | None:
        found = [o for o in self.objects.values() if o.kind == kind and o.audio_id == audio_id]
        return found[-1] if found else None
