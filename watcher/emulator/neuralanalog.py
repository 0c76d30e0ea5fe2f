"""The emulated processing service (Neural Analog) and its signed-URL storage host, with switchable faults.

Jobs finish after ``faults.polls_needed`` status polls, so tests are fast and need no clock. Downloads
answer 307 to a second server (the storage host, another address), which records what headers reached it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from watcher.emulator import audio_processing as proc
from watcher.emulator.server import App, Request

KIND_OF_VERSION = {"original": "audio", "restored": "upscaled", "mastered": "mastered"}


@dataclass
class ProcessingFaults:
    """Faults for the next requests; counters go down as requests meet them."""

    status_429: dict[str, int] = field(default_factory=dict)  # route name (or "*") -> how many 429s
    retry_after: float = 0.2
    status_500: dict[str, int] = field(default_factory=dict)
    failed_kinds: set[str] = field(default_factory=set)  # audio, upscaled, mastered, stem_split -> is_failed
    polls_needed: int = 1  # status polls answered "in progress" before a job completes
    email_queued: int = 0  # archive requests answered with email_notification_queued and no URL
    archive_incomplete: int = 0  # archive zips missing one requested file, flagged archive_incomplete
    expired_urls: int = 0  # storage GETs answered 403, as for an expired signature
    zip_attack: str | None = None  # dotdot, absolute, symlink, oversized, truncated
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


@dataclass
class Obj:
    kind: str  # audio, upscaled, mastered, stem_split, stem
    path: Path  # the file (or, for stem_split, the folder of stems)
    name: str
    audio_id: str
    polls: int = 0
    stems: list[tuple[str, str]] = field(default_factory=list)  # stem_split: (stem_id, name)
    stems_from: str = ""  # stem_split: the kind of object it split


class NeuralAnalogEmulator:
    """State of the emulated service; ``app`` is the API, ``storage_app`` the signed-URL host."""

    def __init__(self, *, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.faults = ProcessingFaults()
        self.objects: dict[str, Obj] = {}
        self.signed: dict[str, Path] = {}
        self.workdir = Path(tempfile.mkdtemp(prefix="watcher-emulator-"))
        self.storage_url = ""  # set once the storage server listens
        self._lock = threading.Lock()
        self.app = App()
        self.storage_app = App()
        r = self.app.route
        r("POST", "/from-file", "POST /from-file")(self._upload)
        r("GET", r"/status/(?P<kind>[a-z_]+)/(?P<id>[\w-]+)", "GET /status")(self._status)
        r("POST", "/upscale-audio", "POST /upscale-audio")(self._job("upscaled"))
        r("POST", "/master-audio", "POST /master-audio")(self._job("mastered"))
        r("POST", "/create-stems", "POST /create-stems")(self._job("stem_split"))
        r("POST", "/download-archive", "POST /download-archive")(self._archive)
        r("GET", r"/download/(?P<kind>[a-z_]+)/(?P<id>[\w-]+)", "GET /download")(self._download)
        self.storage_app.route("GET", r"/signed/(?P<token>\w+)", "GET /signed")(self._signed)

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- plumbing --------------------------------------------------------------------------------------

    def _guard(self, req: Request, route: str) -> bool:
        """Auth and injected status faults; True when the request was answered already."""
        if self.api_key is not None and req.headers.get("X-API-Key") != self.api_key:
            req.drain()
            req.send_json(401, {"detail": "Invalid API key"})
            return True
        if self.faults.take(self.faults.status_429, route):
            req.drain()
            req.send_json(429, {"detail": "Too Many Requests"}, {"Retry-After": f"{self.faults.retry_after:g}"})
            return True
        if self.faults.take(self.faults.status_500, route):
            req.drain()
            req.send_json(500, {"detail": "Internal Server Error"})
            return True
        return False

    def _new_id(self) -> str:
        return secrets.token_hex(8)

    def _sign(self, path: Path) -> str:
        token = secrets.token_hex(12)
        with self._lock:
            self.signed[token] = path
        return f"{self.storage_url}/signed/{token}"

    # -- routes ----------------------------------------------------------------------------------------

    def _upload(self, req: Request) -> None:
        if self._guard(req, "POST /from-file"):
            return
        raw = self.workdir / f"upload-{self._new_id()}.raw"
        with raw.open("wb") as out:
            for chunk in req.iter_body():
                out.write(chunk)
        boundary = req.headers.get("Content-Type", "").partition("boundary=")[2].strip('"')
        audio_id = self._new_id()
        try:
            name, path = _extract_file_part(raw, boundary.encode(), self.workdir / audio_id)
        except ValueError as exc:
            req.send_json(422, {"detail": f"audio: {exc}"})
            return
        finally:
            raw.unlink()
        with self._lock:
            self.objects[audio_id] = Obj("audio", path, name, audio_id)
        req.send_json(200, {"audio_id": audio_id, "status": "in_progress", "message": "Upload received"})

    def _job(self, kind: str) -> Any:
        route = {
            "upscaled": "POST /upscale-audio",
            "mastered": "POST /master-audio",
            "stem_split": "POST /create-stems",
        }[kind]

        def handle(req: Request) -> None:
            if self._guard(req, route):
                return
            body = req.json()
            source_id = next(
                (body[k] for k in ("upscaled_id", "mastered_id", "stem_id", "audio_id") if k in body), None
            )
            source = self.objects.get(str(source_id))
            if source is None:
                req.send_json(422, {"detail": "a known audio_id, upscaled_id or mastered_id is required"})
                return
            if kind == "stem_split" and "preset" not in body:
                req.send_json(422, {"detail": "preset: field required"})
                return
            new_id = self._new_id()
            dest = self.workdir / new_id
            if kind == "upscaled":
                proc.restore(source.path, dest)
                obj = Obj(kind, dest, source.name, source.audio_id)
            elif kind == "mastered":
                proc.master(source.path, dest)
                obj = Obj(kind, dest, source.name, source.audio_id)
            else:
                files = proc.split(source.path, dest, str(body["preset"]))
                obj = Obj(kind, dest, source.name, source.audio_id)
                for f in files:
                    stem_id = self._new_id()
                    obj.stems.append((stem_id, f.stem))
                    self.objects[stem_id] = Obj("stem", f, f.name, source.audio_id)
                obj.stems_from = source.kind
            with self._lock:
                self.objects[new_id] = obj
            req.send_json(200, {"creation_id": new_id} if kind == "stem_split" else {"id": new_id})

        return handle

    def _status(self, req: Request) -> None:
        if self._guard(req, "GET /status"):
            return
        obj = self.objects.get(req.param("id"))
        if obj is None or obj.kind != req.param("kind"):
            req.send_json(404, {"detail": "Not Found"})
            return
        with self._lock:
            obj.polls += 1
            done = obj.polls > self.faults.polls_needed
        failed = done and obj.kind in self.faults.failed_kinds
        payload: dict[str, Any] = {
            "object_type": obj.kind,
            "object_id": req.param("id"),
            "status": "failed" if failed else ("completed" if done else "processing"),
            "is_complete": done and not failed,
            "is_failed": failed,
            "error_message": f"emulated failure of {obj.kind}" if failed else None,
            "download_url": f"/download/{obj.kind}/{req.param('id')}" if done and not failed else None,
            "audio_id": obj.audio_id,
            "status_details": {"stems": [{"stem_id": s, "name": n} for s, n in obj.stems]} if obj.stems else {},
        }
        req.send_json(200, payload)

    def _archive(self, req: Request) -> None:
        if self._guard(req, "POST /download-archive"):
            return
        body = req.json()
        versions = list(body.get("versions") or [])
        audio_id = str(body.get("id") or "")
        if not versions or audio_id not in self.objects:
            req.send_json(422, {"detail": "versions and a known id are required"})
            return
        if self.faults.take_count("email_queued"):
            req.send_json(
                200,
                {
                    "download_url": None,
                    "email_notification_queued": True,
                    "email_notification_threshold_seconds": 60,
                    "archive_incomplete": False,
                },
            )
            return
        incomplete = self.faults.take_count("archive_incomplete")
        zip_path = self.workdir / f"archive-{self._new_id()}.zip"
        self._build_zip(zip_path, audio_id, versions, str(body.get("format", "wav")), incomplete)
        req.send_json(
            200,
            {
                "download_url": self._sign(zip_path),
                "expires_in_seconds": 86400,
                "email_notification_queued": False,
                "archive_incomplete": incomplete,
            },
        )

    def _build_zip(self, zip_path: Path, audio_id: str, versions: list[str], fmt: str, incomplete: bool) -> None:
        source = self.objects[audio_id]
        stem = Path(source.name).stem
        entries: list[tuple[str, Path]] = []
        for version in versions:
            if version in KIND_OF_VERSION:
                obj = source if version == "original" else self._latest(KIND_OF_VERSION[version], audio_id)
                if obj is not None:
                    entries.append((f"{stem} ({version}).{fmt}", obj.path))
            else:
                split = self._latest_split(audio_id, version.removesuffix("_stems"))
                for _, name in split.stems if split else []:
                    entries.append((f"{version}/{name}.{fmt}", split.path / f"{name}.wav"))  # type: ignore[union-attr]
        if incomplete and entries:
            entries.pop()
        attack = self.faults.zip_attack
        with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("EMULATED.txt", proc.NOTE)
            for arcname, path in entries:
                zf.write(path, arcname)
            if attack == "dotdot":
                zf.writestr("../escaped.wav", b"RIFF")
            elif attack == "absolute":
                zf.writestr("/srv/absolute.wav", b"RIFF")
            elif attack == "symlink":
                info = zipfile.ZipInfo("link.wav")
                info.external_attr = 0o120777 << 16
                zf.writestr(info, "/etc/passwd")
            elif attack == "oversized":
                zf.writestr("huge.wav", b"\0" * (64 << 20))
        if attack == "truncated":
            size = zip_path.stat().st_size
            with zip_path.open("r+b") as fh:
                fh.truncate(size // 2)

    def _latest(self, kind: str, audio_id: str) -> Obj | None:
        found = [o for o in self.objects.values() if o.kind == kind and o.audio_id == audio_id]
        return found[-1] if found else None

    def _latest_split(self, audio_id: str, source: str) -> Obj | None:
        kind = {"original": "audio", "restored": "upscaled", "mastered": "mastered"}[source]
        found = [
            o
            for o in self.objects.values()
            if o.kind == "stem_split" and o.audio_id == audio_id and o.stems_from == kind
        ]
        return found[-1] if found else None

    def _download(self, req: Request) -> None:
        if self._guard(req, "GET /download"):
            return
        obj = self.objects.get(req.param("id"))
        if obj is None or obj.kind != req.param("kind") or obj.kind == "stem_split":
            req.send_json(404, {"detail": "Not Found"})
            return
        req.redirect(self._sign(obj.path))

    def _signed(self, req: Request) -> None:
        with self._lock:
            path = self.signed.get(req.param("token"))
        if path is None or self.faults.take_count("expired_urls"):
            req.send_bytes(
                403,
                b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>",
                "application/xml",
            )
            return
        handler = req.handler
        handler.send_response(200)
        handler.send_header("Content-Type", "application/octet-stream")
        handler.send_header("Content-Length", str(path.stat().st_size))
        handler.end_headers()
        with path.open("rb") as fh:
            shutil.copyfileobj(fh, handler.wfile, 1 << 20)


def _extract_file_part(raw: Path, boundary: bytes, dest: Path) -> tuple[str, Path]:
    """Copy the ``audio`` part of a multipart body on disk to ``dest`` without loading it whole."""
    if not boundary:
        raise ValueError("not a multipart body")
    size = raw.stat().st_size
    with raw.open("rb") as fh:
        head = fh.read(min(size, 1 << 16))
        start_marker = b"--" + boundary + b"\r\n"
        pos = head.find(start_marker)
        header_end = head.find(b"\r\n\r\n", pos)
        if pos < 0 or header_end < 0:
            raise ValueError("no file part")
        headers = head[pos + len(start_marker) : header_end].decode("utf-8", "replace")
        if 'name="audio"' not in headers:
            raise ValueError("field required")
        name = headers.partition('filename="')[2].partition('"')[0] or "audio"
        data_start = header_end + 4
        tail_len = min(size, 1 << 16)
        fh.seek(size - tail_len)
        tail = fh.read()
        end_in_tail = tail.find(b"\r\n--" + boundary)
        if end_in_tail < 0:
            raise ValueError("unterminated part")
        data_end = size - tail_len + end_in_tail
        fh.seek(data_start)
        remaining = data_end - data_start
        with dest.open("wb") as out:
            while remaining > 0:
                chunk = fh.read(min(1 << 20, remaining))
                if not chunk:
                    break
                out.write(chunk)
                remaining -= len(chunk)
    os.utime(dest)
    return name, dest
