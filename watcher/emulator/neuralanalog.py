"""The emulated processing service (Neural Analog) and its signed-URL storage host: the routes, with switchable
faults. The state lives in watcher.emulator.processing_state, the artifacts in watcher.emulator.audio_processing.

``app`` serves the API; ``storage_app`` must be served by a second HTTPServerThread (another host:port),
as signed URLs point elsewhere: its recorded requests show which headers reached storage. Jobs finish
after ``faults.polls_needed`` status polls (default 1: the first poll says in progress, the next complete),
so tests need no clock. Processing is emulated (:mod:`watcher.emulator.audio_processing`).

Wiring: ``api, storage = emu.start_pair()`` ... ``api.stop(); storage.stop(); emu.close()``, or use
:class:`watcher.emulator.Emulator`, which serves both services.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from watcher.audiofile import sniff_format
from watcher.emulator import audio_processing as proc
from watcher.emulator.faults import PAID_POST_FAULTS, REFUSALS, Chaos, Ledger, account_of
from watcher.emulator.multipart import MultipartParser
from watcher.emulator.processing_state import (
    HOSTILE_STEM_NAMES,
    JOB_ROUTES,
    OPERATION_OF_KIND,
    PAID_ROUTES,
    SOURCE_FIELDS,
    Obj,
    ProcessingFaults,
    ProcessingState,
)
from watcher.emulator.server import App, HTTPServerThread, Request
from watcher.emulator.signed import serve_signed

__all__ = ["HOSTILE_STEM_NAMES", "NeuralAnalogEmulator", "Obj", "ProcessingFaults"]


def _seconds(path: Path) -> float | None:
    """The audio seconds the service bills for an upload (its headers' duration), or None when they give none."""
    from watcher.media import audio_info

    with path.open("rb") as fh:
        container = sniff_format(fh.read(64))
    return audio_info(path, container=container).duration

class NeuralAnalogEmulator:
    """State of the emulated service; ``app`` is the API, ``storage_app`` the signed-URL host.

    ``ledger`` counts, per original upload's sha256, each ``upload``, ``restore``, ``master`` and ``stems``
    request whose work was done, even when its answer was then lost; refusals before any work are not counted.
    """

    def __init__(
        self,
        storage_url: Callable[[], str] | str = "",
        *,
        api_key: str | None = None,
        ledger: Ledger | None = None,
        chaos: Chaos | None = None,
    ) -> None:
        self.storage_url = storage_url
        self.api_key = api_key
        self.state = ProcessingState()
        self.ledger = ledger or Ledger()
        self.chaos = chaos or Chaos()
        self._lock = self.state.lock
        self.app = App()
        self.storage_app = App()
        r = self.app.route
        r("POST", "/from-file", "POST /from-file")(self._upload)
        r("GET", r"/status/(?P<kind>[a-z_]+)/(?P<id>[\w-]+)", "GET /status", key_check=_key_check)(self._status)
        for kind, route in JOB_ROUTES.items():
            r("POST", route.split(" ", 1)[1], route)(self._job(kind, route))
        r("POST", "/download-archive", "POST /download-archive")(self._archive)
        r("GET", r"/download/(?P<kind>[a-z_]+)/(?P<id>[\w-]+)", "GET /download")(self._download)
        self.storage_app.route("GET", r"/signed/(?P<token>\w+)", "GET /signed")(self._signed)

    def _signed(self, req: Request) -> None:
        """GET /signed/TOKEN on the storage host (see watcher.emulator.signed)."""
        serve_signed(req, self.state, self.chaos)

    @property
    def storage_url(self) -> str:
        """Base URL of the storage host (signed URLs point there)."""
        value = self._storage_url
        return (value() if callable(value) else value).rstrip("/")

    @storage_url.setter
    def storage_url(self, value: Callable[[], str] | str) -> None:
        self._storage_url = value

    def start_pair(self, host: str = "127.0.0.1") -> tuple[HTTPServerThread, HTTPServerThread]:
        """Serve the API and the storage host on two started loopback servers: ``(api, storage)``."""
        api = HTTPServerThread([self.app], host)
        storage = HTTPServerThread([self.storage_app], host)
        self.storage_url = storage.url
        return api.start(), storage.start()

    @property
    def faults(self) -> ProcessingFaults:
        """The faults the next requests meet (switch them on by setting fields)."""
        return self.state.faults

    @property
    def objects(self) -> dict[str, Obj]:
        return self.state.objects

    @property
    def signed(self) -> dict[str, tuple[Path, float | None]]:
        return self.state.signed

    @property
    def workdir(self) -> Path:
        return self.state.workdir

    def reset(self) -> None:
        """Forget every object, signed URL and fault (for servers shared by several tests)."""
        self.state.reset()
        self.ledger.clear()
        self.chaos.clear()

    def close(self) -> None:
        self.state.close()

    # -- plumbing --------------------------------------------------------------------------------------

    def _guard(self, req: Request, route: str) -> str | None:
        """Auth and injected faults. Returns ``"answered"`` when the request was answered already,
        ``"lose_answer"`` when chaos chose to lose this paid request's answer after its work, else None."""
        if self.api_key is not None and req.headers.get("X-API-Key") != self.api_key:
            req.drain()
            req.send_json(401, {"detail": "Invalid API key"})
            return "answered"
        chaos = self.chaos.draw(route, PAID_POST_FAULTS if route in PAID_ROUTES else REFUSALS)
        if self.faults.take(self.faults.status_429, route) or chaos == "429":
            retry_after = self.chaos.retry_after if chaos else self.faults.retry_after
            req.drain()
            req.send_json(429, {"detail": "Too Many Requests"}, {"Retry-After": f"{retry_after:g}"})
            return "answered"
        if self.faults.take(self.faults.status_500, route) or chaos == "500":
            req.drain()
            req.send_json(500, {"detail": "Internal Server Error"})
            return "answered"
        status = 503 if chaos == "503" else self.faults.next_status(route)
        if status is not None:
            req.drain()
            req.send_json(status, {"detail": f"emulated HTTP {status}"})
            return "answered"
        if route in PAID_ROUTES and self.faults.take(self.faults.no_id, route):
            req.drain()
            req.send_json(200, {"status": "ok"})
            return "answered"
        return chaos

    def _bill(self, req: Request, source: Obj, operation: str) -> None:
        """The work is done: it goes on the bill of the request's account, for the uploaded audio's content."""
        account = account_of(req.headers.get("X-API-Key"))
        host = req.headers.get("Host", "")
        self.ledger.charge("processing", host, account, source.sha256, [operation], source.seconds)

    def _answer(self, req: Request, route: str, payload: dict[str, Any], *, lose: bool = False) -> None:
        """Send the answer, unless a fault (or ``lose``) says the work is done but the answer gets lost, or
        comes without its ID (``done_without_id``) or as a redirect (``done_then_303``)."""
        if self.faults.take(self.faults.lose_answer, route) or lose:
            req.abort_connection()
            return
        if self.faults.take(self.faults.done_without_id, route):
            req.send_json(200, {"status": "ok", "message": "queued"})
            return
        if self.faults.take(self.faults.done_then_303, route):
            req.drain()
            req.send_bytes(303, b"", "text/plain", headers={"Location": "/status/audio/elsewhere"})
            return
        req.send_json(200, payload)

    # -- routes ----------------------------------------------------------------------------------------

    def _upload(self, req: Request) -> None:
        route = "POST /from-file"
        guard = self._guard(req, route)
        if guard == "answered":
            return
        boundary = req.headers.get("Content-Type", "").partition("boundary=")[2].strip().strip('"')
        audio_id = self.state.new_id()
        dest = self.workdir / audio_id

        def sink(field_name: str, filename: str) -> IO[bytes]:
            return (dest if field_name == "audio" else self.workdir / f"{audio_id}-{field_name}").open("wb")

        try:
            parser = MultipartParser(boundary, sink)
        except ValueError as exc:
            req.drain()
            req.send_json(422, {"detail": f"audio: {exc}"})
            return
        try:
            self._feed(req, parser)
        except ValueError as exc:
            parser.abort()
            dest.unlink(missing_ok=True)
            req.send_json(422, {"detail": f"audio: {exc}"})
            return
        except BaseException:
            parser.abort()
            dest.unlink(missing_ok=True)
            raise
        part = next((p for p in parser.parts if p.name == "audio" and p.filename is not None), None)
        if part is None:
            req.send_json(422, {"detail": [{"loc": ["body", "audio"], "msg": "field required"}]})
            return
        name = part.filename or ""
        refused = next((r for r in sorted(self.faults.reject_uploads) if r in name), None)
        if refused is not None:
            dest.unlink(missing_ok=True)
            req.send_json(422, {"detail": f"audio: the file {name!r} was refused (it contains {refused!r})"})
            return
        obj = Obj("audio", dest, part.filename or "audio", audio_id, sha256=part.sha256, size=part.size)
        obj.seconds = _seconds(dest)
        obj.params = dict(parser.fields)
        with dest.open("rb") as fh:
            if sniff_format(fh.read(64)) is None:
                obj.failed = "the file could not be decoded as audio (emulated check)"
        with self._lock:
            self.objects[audio_id] = obj
        self._bill(req, obj, "upload")
        payload = {"audio_id": audio_id, "status": "in_progress", "message": "Upload received"}
        self._answer(req, route, payload, lose=guard == "lose_answer")

    def _feed(self, req: Request, parser: MultipartParser) -> None:
        """Read the upload's body into the parser; the drop_upload_after fault hangs up part way."""
        limit = self.faults.drop_upload_after
        received = 0
        for chunk in req.iter_body():
            if limit is not None and received + len(chunk) >= limit:
                with self.faults.lock:
                    self.faults.drop_upload_after = None
                req.abort_connection()
                raise ConnectionError("emulated: connection dropped during the upload")
            received += len(chunk)
            parser.feed(chunk)
        parser.close()

    def _job(self, kind: str, route: str) -> Callable[[Request], None]:
        def handle(req: Request) -> None:
            guard = self._guard(req, route)
            if guard == "answered":
                return
            body = req.json()
            source_field = next((k for k in SOURCE_FIELDS if body.get(k)), None)
            source = self.objects.get(str(body.get(source_field))) if source_field else None
            if source is None or (source_field == "stem_id" and source.kind != "stem"):
                req.send_json(422, {"detail": "a known audio_id, upscaled_id, mastered_id or stem_id is required"})
                return
            if kind == "mastered" and body.get("use_restored") and source.kind == "audio":
                restored = self.state.latest("upscaled", source.audio_id)
                source = restored or source
            preset = str(body.get("preset", ""))
            if kind == "stem_split" and preset not in proc.STEM_NAMES:
                known = ", ".join(proc.STEM_NAMES)
                req.send_json(422, {"detail": f"preset: must be one of {known} (got {preset!r})"})
                return
            new_id = self.state.new_id()
            dest = self.workdir / new_id
            obj = Obj(kind, dest, source.name, source.audio_id, params=dict(body), failed=self.state.error(source))
            if kind == "upscaled":
                proc.restore(source.path, dest)
            elif kind == "mastered":
                proc.master(source.path, dest)
            else:
                obj.stems_from = source.kind
                for f in proc.split(source.path, dest, preset):
                    stem_id = self.state.new_id()
                    obj.stems.append((stem_id, f.stem))
                    with self._lock:
                        self.objects[stem_id] = Obj("stem", f, f.stem, source.audio_id, parent=new_id)
            with self._lock:
                self.objects[new_id] = obj
            self._bill(req, self.objects[source.audio_id], OPERATION_OF_KIND[kind])
            payload = {"creation_id": new_id} if kind == "stem_split" else {"id": new_id}
            self._answer(req, route, payload, lose=guard == "lose_answer")

        return handle

    def _status(self, req: Request) -> None:
        if req.param("id") == KEY_CHECK_ID:  # the key, and nothing else: injected faults are for real calls
            if self.api_key is not None and req.headers.get("X-API-Key") != self.api_key:
                req.send_json(401, {"detail": "Invalid API key"})
            else:
                req.send_json(404, {"detail": "Not Found"})
            return
        if self._guard(req, "GET /status") == "answered":
            return
        if self.faults.take_count("malformed_status"):
            req.send_bytes(200, b'{"object_type": "audio", "status": "compl', "application/json")
            return
        object_id = req.param("id")
        obj = self.objects.get(object_id)
        if obj is None or obj.kind != req.param("kind"):
            req.send_json(404, {"detail": "Not Found"})
            return
        with self._lock:
            obj.polls += 1
            done = self.state.done(obj)
            if not done:
                obj.waited += 1
        error = self.state.error(obj) if done else None
        complete = done and error is None
        details: dict[str, Any] = {"emulated": True, "polls": obj.polls}
        if obj.stems and complete:
            hostile = self.faults.hostile_stem_names
            details["stems"] = [
                {"stem_id": s, "name": HOSTILE_STEM_NAMES[i % len(HOSTILE_STEM_NAMES)] if hostile else n}
                for i, (s, n) in enumerate(obj.stems)
            ]
        req.send_json(
            200,
            {
                "object_type": obj.kind,
                "object_id": object_id,
                "status": "failed" if error else ("completed" if complete else "in_progress"),
                "is_complete": complete,
                "is_failed": error is not None,
                "error_message": error,
                "download_url": f"/download/{obj.kind}/{object_id}" if complete and obj.kind != "stem_split" else None,
                "audio_id": obj.audio_id,
                "status_details": details,
            },
        )

    def _archive(self, req: Request) -> None:
        if self._guard(req, "POST /download-archive") == "answered":
            return
        body = req.json()
        if self.faults.take_count("not_ready_archive"):
            req.send_json(409, {"detail": "archive not ready yet"})
            return
        versions = [str(v) for v in body.get("versions") or []]
        ids = [str(i) for i in (body.get("ids") or ([body["id"]] if body.get("id") else []))]
        problem = self.state.archive_problem(versions, ids)
        if problem:
            req.send_json(422, {"detail": problem})
            return
        if self.faults.take_count("email_queued"):
            req.send_json(
                200,
                {
                    "download_url": None,
                    "expires_in_seconds": None,
                    "email_notification_queued": True,
                    "email_notification_threshold_seconds": 60,
                    "archive_incomplete": False,
                },
            )
            return
        fmt = str(body.get("format") or "wav")
        entries: list[tuple[str, Path]] = []
        for audio_id in ids:
            prefix = f"{Path(self.objects[audio_id].name).stem}/" if len(ids) > 1 else ""
            entries += [(prefix + name, path) for name, path in self.state.entries(audio_id, versions)]
        incomplete = self.faults.take_count("archive_incomplete") and len(entries) > 0
        if incomplete:
            entries.pop()
        asked = {v: str(body.get(f"{v}_format") or fmt) for v in versions}
        zip_path = self.workdir / f"archive-{self.state.new_id()}.zip"
        proc.build_zip(zip_path, entries, proc.archive_note(asked), self.faults.zip_attack, self.faults.zip_bomb_bytes)
        req.send_json(
            200,
            {
                "download_url": self.state.sign(zip_path, self.storage_url),
                "expires_in_seconds": 86400,
                "email_notification_queued": False,
                "email_notification_threshold_seconds": 60,
                "archive_incomplete": incomplete,
            },
        )

    def _download(self, req: Request) -> None:
        if self._guard(req, "GET /download") == "answered":
            return
        if self.faults.redirect_to is not None:
            req.redirect(self.faults.redirect_to)
            return
        obj = self.objects.get(req.param("id"))
        if obj is None or obj.kind != req.param("kind") or obj.kind == "stem_split":
            req.send_json(404, {"detail": "Not Found"})
            return
        if not self.state.done(obj) or self.state.error(obj):
            req.send_json(409, {"detail": f"{obj.kind} {req.param('id')} is not complete"})
            return
        req.redirect(self.state.sign(obj.path, self.storage_url))


KEY_CHECK_ID = "watcher-doctor-check"


def _key_check(path: str, query: dict[str, list[str]]) -> bool:
    """watcher's key check asks the status of an ID that cannot exist: it bills nothing."""
    return path.endswith("/" + KEY_CHECK_ID)
