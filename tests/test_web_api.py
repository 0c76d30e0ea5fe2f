"""The web page's server over real HTTP, in a real daemon with the emulator: every endpoint, every auth rule."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from structlog.testing import capture_logs

from tests.conftest import wait_for, write_tone
from tests.webutil import Page, new_emulator, web_settings
from watcher import commands
from watcher.config import MetricsConfig
from watcher.emulator import Emulator
from watcher.log import _scrub
from watcher.status import render
from watcher.web import data

ENDPOINTS = [
    ("GET", "/"),
    ("GET", "/files"),
    ("GET", "/file?path=/nowhere.wav"),
    ("GET", "/audio?path=/nowhere.wav"),
    ("GET", "/static/app.js"),
    ("GET", "/static/style.css"),
    ("GET", "/api/status"),
    ("GET", "/api/files"),
    ("GET", "/api/file?path=/nowhere.wav"),
    ("GET", "/api/events"),
    ("GET", "/metrics"),
    ("POST", "/api/retry"),
    ("POST", "/api/pause"),
    ("POST", "/api/resume"),
]
STREAM = "POST /v1/analysis/stream"


@pytest.fixture
def emu() -> Iterator[Emulator]:
    e = new_emulator()
    yield e
    e.stop()


@pytest.fixture
def page(tmp_path: Path, inbox: Path, emu: Emulator, run_daemon) -> Iterator[Page]:
    settings = web_settings(tmp_path, inbox, emu)
    p = Page(run_daemon(settings), settings)
    p.settings = settings  # type: ignore[attr-defined]
    yield p
    p.close()


def status_of(client: httpx.Client, method: str, url: str) -> int:
    with client.stream(method, url, json={} if method == "POST" else None) as r:
        return r.status_code


def settled(page: Page, path: Path, state: str = "done", timeout: float = 30) -> dict:
    """The file's row once it reached ``state``."""

    def row() -> dict | None:
        rows = [r for r in page.json("/api/files")["files"] if r["path"] == str(path)]
        return rows[0] if rows and rows[0]["state"] == state else None

    return wait_for(row, timeout=timeout, what=f"{path.name} {state}")


# -- auth -----------------------------------------------------------------------------------------


def test_every_endpoint_needs_the_token(page: Page) -> None:
    """Without a token, with a wrong Bearer token or a wrong cookie: 401 everywhere; with the token: served."""
    wrong_bearer = httpx.Client(base_url=page.url, headers={"Authorization": "Bearer not-the-token"}, timeout=10)
    wrong_cookie = httpx.Client(base_url=page.url, cookies={page.cookie: "not-a-session"}, timeout=10)
    token_cookie = httpx.Client(base_url=page.url, cookies={page.cookie: page.token}, timeout=10)
    for method, url in ENDPOINTS:
        r = page.anonymous.request(method, url, json={} if method == "POST" else None)
        assert r.status_code == 401, (method, url)
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert status_of(wrong_bearer, method, url) == 401, (method, url)
        assert status_of(wrong_cookie, method, url) == 401, (method, url)
        assert status_of(token_cookie, method, url) == 401, (method, url)  # the cookie is a session, not the token
        assert status_of(page.client, method, url) in (200, 404, 422), (method, url)
    assert page.token not in page.anonymous.get("/api/status").text
    for client in (wrong_bearer, wrong_cookie, token_cookie):
        client.close()


def test_login_link_opens_a_session_once(page: Page) -> None:
    """A login link sets an HttpOnly, SameSite=Strict cookie named for the port, with a lifetime, holding a random
    session (not the token); the link works once; the token in the URL logs nobody in; logout ends the session."""
    link = page.login_link()
    assert page.token not in link
    r = page.anonymous.get(link)
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"].lower()
    assert cookie.startswith(f"{page.cookie}=")
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
    assert f"max-age={12 * 3600}" in cookie
    sid = r.cookies[page.cookie]
    assert sid != page.token and len(sid) >= 32
    session = httpx.Client(base_url=page.url, cookies={page.cookie: sid}, timeout=10)
    assert session.get("/api/status").status_code == 200
    assert session.get("/").status_code == 200
    again = page.anonymous.get(link)  # used already
    assert again.status_code == 401 and "set-cookie" not in again.headers
    assert page.anonymous.get("/login", params={"token": page.token}).status_code == 200  # the form, no session
    assert "set-cookie" not in page.anonymous.get("/login", params={"token": page.token}).headers
    forged = link[:-3] + ("aaa" if not link.endswith("aaa") else "bbb")
    assert page.anonymous.get(forged).status_code == 401
    form = page.anonymous.post("/login", data={"token": page.token})  # the form: the token, in a POST body
    assert form.status_code == 303 and form.cookies[page.cookie] not in (sid, page.token)
    out = session.post("/logout")
    assert out.status_code == 303 and out.headers["location"] == "/login"
    assert session.get("/api/status").status_code == 401  # revoked on the server, not only forgotten
    session.close()


def test_two_daemons_keep_their_own_sessions(tmp_path: Path, inbox: Path, emu: Emulator, run_daemon) -> None:
    """Two pages on one machine set cookies of different names: logging into one does not log out of the other."""
    pages = []
    for name in ("one", "two"):
        folder = tmp_path / name / "in"
        folder.mkdir(parents=True)
        settings = web_settings(tmp_path / name, folder, emu, archive=False)
        pages.append(Page(run_daemon(settings), settings))
    first, second = pages
    assert first.cookie != second.cookie
    browser = httpx.Client(timeout=10)  # one cookie jar for both, as a browser has for 127.0.0.1
    assert browser.get(first.login_link()).status_code == 303
    assert browser.get(second.login_link()).status_code == 303
    assert browser.get(f"{first.url}/api/status").status_code == 200
    assert browser.get(f"{second.url}/api/status").status_code == 200
    browser.close()
    for p in pages:
        p.close()


def test_cross_origin_post_is_refused(page: Page, inbox: Path) -> None:
    """A POST whose Origin is another site is 403 even with the token, and changes nothing; this page's is fine."""
    for origin in ("http://evil.example", "null", page.url.replace("127.0.0.1", "localhost")):
        r = page.client.post("/api/pause", json={"folder": str(inbox)}, headers={"Origin": origin})
        assert r.status_code == 403, origin
    folders = page.json("/api/status")["folders"]
    assert [f["paused"] for f in folders] == [False]
    ok = page.client.post("/api/pause", json={"folder": str(inbox)}, headers={"Origin": page.url})
    assert ok.status_code == 200 and ok.json() == {"folder": str(inbox), "paused": True}


def test_answers_carry_a_strict_content_security_policy(page: Page) -> None:
    for r in (page.client.get("/"), page.anonymous.get("/api/status"), page.client.get("/static/app.js")):
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert r.headers["x-content-type-options"] == "nosniff"


def test_generated_token_is_private_and_never_logged(tmp_path: Path, inbox: Path, emu: Emulator, run_daemon) -> None:
    """The first start makes a 0600 token file; every start logs a one-time login link, never the token."""
    settings = web_settings(tmp_path, inbox, emu)
    with capture_logs() as logs:
        d = run_daemon(settings)
        first = Page(d, settings)
        d.stop()
        d2 = run_daemon(settings)
        second = Page(d2, settings)
        d2.stop()
    token_file = settings.state_dir / "web-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600 and len(first.token) >= 32
    logins = [e for e in logs if e["event"] == "web.login"]
    assert [e["url"].split("/login?nonce=")[0] for e in logins] == [first.url, second.url]
    assert logins[0]["url"] != logins[1]["url"]
    assert not any(first.token in json.dumps(e, default=str) for e in logs)
    assert second.token == first.token
    assert _scrub(f"token {first.token} seen") == "token [redacted] seen"
    first.close()
    second.close()


def test_configured_token_file_is_used(tmp_path: Path, inbox: Path, emu: Emulator, run_daemon) -> None:
    token_file = tmp_path / "my-token"
    token_file.write_text("a-configured-token-of-enough-length\n")
    settings = web_settings(tmp_path, inbox, emu, token_file=token_file)
    d = run_daemon(settings)
    url = wait_for(lambda: d.daemon.web and d.daemon.web.url)
    assert httpx.get(f"{url}/api/status", headers={"Authorization": "Bearer a-configured-token-of-enough-length"})
    assert not (settings.state_dir / "web-token").exists()


def test_healthz_needs_no_token_and_says_only_whether_the_daemon_is_healthy(page: Page) -> None:
    """/healthz answers anyone with 200 {"healthy": true}, or 503 {"healthy": false} when the heartbeat is stale."""
    r = page.anonymous.get("/healthz")
    assert r.status_code == 200 and r.json() == {"healthy": True}
    assert r.headers["cache-control"] == "no-store"
    page.daemon.daemon.web.ctx.healthy = lambda: False
    r = page.anonymous.get("/healthz")
    assert r.status_code == 503 and r.json() == {"healthy": False}
    assert page.anonymous.get("/api/status").status_code == 401, "only /healthz is open"


def test_daemon_is_unhealthy_once_its_heartbeat_stops(tmp_path: Path, inbox: Path, emu: Emulator) -> None:
    """Healthy while the heartbeat ran within three beats; a stopped heartbeat turns it unhealthy, a beat back."""
    from watcher.daemon import Daemon

    daemon = Daemon(web_settings(tmp_path, inbox, emu), handle_signals=False, heartbeat=0.05)
    assert daemon.healthy()
    wait_for(lambda: not daemon.healthy(), timeout=5, what="the stale heartbeat to show")
    daemon.housekeeping.alive()
    assert daemon.healthy()


# -- the JSON API ----------------------------------------------------------------------------------


def test_status_is_the_cli_document(page: Page, inbox: Path) -> None:
    """/api/status is the document of `watcher status` (brief: open files and first problems, read through
    indexes), including whether and where the page runs and the backlog."""
    write_tone(inbox / "one.wav", 1.0)
    settled(page, inbox / "one.wav")
    doc = page.json("/api/status")
    assert doc == commands.status(page.settings, brief=True)  # type: ignore[attr-defined]
    assert doc["backlog"]["analyze"]["waiting"] == 0 and doc["backlog"]["analyze"]["finished_recently"] == 1
    assert doc["counts"] == {"analyze": {"done": 1}, "archive": {"done": 1}}
    assert doc["web"]["running"] is True and doc["web"]["url"] == page.url
    assert f"web page: running at {page.url}" in render(doc)


def test_file_list_filters_and_pages(page: Page, inbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """state, folder, q, key, bpm_min/bpm_max and page select rows; key, tempo and loudness come from sidecars."""
    names = ["alpha.wav", "beta.wav", "gamma.wav"]
    for i, name in enumerate(names):
        write_tone(inbox / name, 0.6 + i * 0.3, freq=220.0 * (i + 1))
    for name in names:
        settled(page, inbox / name)
    rows = page.json("/api/files")["files"]
    assert [r["name"] for r in rows] == names
    for r in rows:
        doc = json.loads((inbox / f"{r['name']}.analysis.json").read_text())
        assert r["bpm"] == doc["models"]["bpm_degara"]["results"]["bpm"]
        assert r["key"] == doc["models"]["key"]["results"]["key"][0]
        assert r["integrated_lufs"] == doc["models"]["loudness_ebur128"]["results"]["integratedLoudness"][0]
    assert page.json("/api/files", state="done")["total"] == 3
    assert page.json("/api/files", state="failed")["total"] == 0
    assert page.json("/api/files", folder=str(inbox))["total"] == 3
    assert page.json("/api/files", folder="/elsewhere")["total"] == 0
    assert [r["name"] for r in page.json("/api/files", q="ETA")["files"]] == ["beta.wav"]
    first = rows[0]
    by_key = page.json("/api/files", key=f"{first['key']} {first['scale']}")["files"]
    assert first["path"] in [r["path"] for r in by_key]
    assert all((r["key"], r["scale"]) == (first["key"], first["scale"]) for r in by_key)
    bpm = first["bpm"]
    in_range = page.json("/api/files", bpm_min=bpm - 0.5, bpm_max=bpm + 0.5)["files"]
    assert first["path"] in [r["path"] for r in in_range] and all(abs(r["bpm"] - bpm) <= 0.5 for r in in_range)
    assert page.json("/api/files", bpm_min=1000)["total"] == 0
    monkeypatch.setattr(data, "PAGE_SIZE", 2)
    second = page.json("/api/files", page=2)
    assert second["total"] == 3 and second["pages"] == 2 and [r["name"] for r in second["files"]] == ["gamma.wav"]


def test_file_detail_has_sidecar_jobs_and_delivery(page: Page, inbox: Path, tmp_path: Path) -> None:
    audio = inbox / "song.wav"
    write_tone(audio, 1.5)
    settled(page, audio)
    info = page.json("/api/file", path=str(audio))
    sidecar = json.loads((inbox / "song.wav.analysis.json").read_text())
    assert info["sidecar"] == sidecar and info["state"] == "done"
    loud = sidecar["models"]["loudness_ebur128"]["results"]
    assert info["curves"]["momentary"] == loud["momentaryLoudness"][0]
    assert info["curves"]["beats"] == sidecar["models"]["bpm_degara"]["results"]["beat_positions"]
    assert {(j["pipeline"], j["state"]) for j in info["jobs"]} == {("analyze", "done"), ("archive", "done")}
    assert [j["attempts"] for j in info["jobs"]] == [0, 0]  # no failed attempt
    manifest = json.loads((tmp_path / "out" / "song" / "manifest.json").read_text())
    assert info["delivery"]["manifest"] == manifest
    assert {f["version"] for f in info["delivery"]["files"]} >= {"mastered", "original"}
    assert [f["path"] for f in info["delivery"]["files"]] == [f["path"] for f in manifest["files"]]
    assert page.client.get("/api/file", params={"path": str(inbox / "other.wav")}).status_code == 404
    assert page.client.get("/api/file").status_code == 422
    html = page.client.get("/file", params={"path": str(audio)}).text
    assert f'data-count="{len(loud["momentaryLoudness"][0])}"' in html


def test_retry_sends_a_failed_file_again(tmp_path: Path, inbox: Path, emu: Emulator, run_daemon) -> None:
    """POST /api/retry {"paths": [...]} makes a failed file due now: the service gets a new request."""
    settings = web_settings(tmp_path, inbox, emu, archive=False)
    page = Page(run_daemon(settings), settings)
    emu.analysis.faults.reject_models = {"key"}
    audio = inbox / "bad.wav"
    write_tone(audio, 0.5)
    failed = settled(page, audio, "failed")
    assert "unknown model: key" in failed["jobs"]["analyze"]["error"]
    sent = emu.api.counts()[STREAM]
    emu.analysis.faults.reject_models = set()
    r = page.client.post("/api/retry", json={"paths": [str(audio)]})
    assert r.status_code == 200 and r.json() == {"retried": 1}
    settled(page, audio, "done")
    assert emu.api.counts()[STREAM] == sent + 1
    assert page.client.post("/api/retry", json={"failed": True}).json() == {"retried": 0}
    assert page.client.post("/api/retry", json={"in_doubt": True}).json() == {"retried": 0}
    assert page.client.post("/api/retry", json={}).status_code == 422
    assert page.client.post("/api/retry", json={"paths": "x"}).status_code == 422
    assert page.client.post("/api/retry", content=b"{not json").status_code == 422
    page.close()


def test_pause_and_resume(page: Page, inbox: Path) -> None:
    def paused() -> bool:
        return page.json("/api/status")["folders"][0]["paused"]

    assert page.client.post("/api/pause", json={"folder": str(inbox)}).json()["paused"] is True
    assert paused() is True
    assert page.client.post("/api/resume", json={"folder": str(inbox)}).json()["paused"] is False
    assert paused() is False
    assert page.client.post("/api/pause", json={"folder": "/not/watched"}).status_code == 404
    assert page.client.post("/api/pause", json={}).status_code == 422


def test_event_stream_tells_of_a_file_from_settled_to_done(page: Page, inbox: Path) -> None:
    seen: list[tuple[str, dict]] = []
    with page.client.stream("GET", "/api/events", timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        assert next(lines) == ": connected"
        write_tone(inbox / "live.wav", 0.5)
        event = None
        for line in lines:
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event:
                seen.append((event, json.loads(line[6:])))
                if sum(1 for e, _ in seen if e == "done") == 2:
                    break
    kinds = [e for e, _ in seen]
    assert kinds[0] == "settled" and seen[0][1]["path"] == str(inbox / "live.wav")
    assert {m["pipeline"] for e, m in seen if e == "done"} == {"analyze", "archive"}
    assert "spend" in kinds  # the paid calls of the archive pipeline
    spent = [m for e, m in seen if e == "spend"]
    assert {m["budget"] for m in spent} >= {"processing"}  # service and outcome: deprecated names, until 0.4.0
    assert all(m["budget"] == m["service"] and m["ending"] == m["outcome"] for m in spent)
    assert {m["ending"] for m in spent} <= {"answered", "partial", "in_doubt", "late", "not_sent", "refused"}


def test_audio_is_served_with_ranges_only_from_watched_and_output_folders(
    page: Page, inbox: Path, tmp_path: Path
) -> None:
    audio = inbox / "tone.wav"
    write_tone(audio, 1.0)
    settled(page, audio)
    raw = audio.read_bytes()
    r = page.client.get("/audio", params={"path": str(audio)}, headers={"Range": "bytes=100-199"})
    assert r.status_code == 206 and r.content == raw[100:200]
    assert r.headers["content-range"] == f"bytes 100-199/{len(raw)}"
    whole = page.client.get("/audio", params={"path": str(audio)})
    assert whole.status_code == 200 and whole.content == raw and whole.headers["accept-ranges"] == "bytes"
    delivered = tmp_path / "out" / "tone" / "tone (mastered).wav"
    assert page.client.get("/audio", params={"path": str(delivered)}).status_code == 200
    outside = tmp_path / "secret.wav"
    outside.write_bytes(b"RIFF secret")
    (inbox / "link.wav").symlink_to(outside)
    for path in (outside, inbox / "link.wav", inbox / ".." / "secret.wav", tmp_path / "state" / "web-token"):
        r = page.client.get("/audio", params={"path": str(path)})
        assert r.status_code == 404 and b"secret" not in r.content, path


def test_metrics_move_onto_the_page_server(tmp_path: Path, inbox: Path, emu: Emulator, run_daemon) -> None:
    settings = web_settings(tmp_path, inbox, emu).model_copy(update={"metrics": MetricsConfig(enabled=True, port=0)})
    page = Page(run_daemon(settings), settings)
    write_tone(inbox / "m.wav", 0.5)
    settled(page, inbox / "m.wav")
    assert page.daemon.daemon.metrics_address == page.daemon.daemon.web.address
    assert page.anonymous.get("/metrics").status_code == 401
    text = page.client.get("/metrics").text
    assert 'watcher_files_done_total{pipeline="analyze"} 1.0' in text
    page.close()


# -- when the page cannot run ----------------------------------------------------------------------


def test_taken_port_is_a_warning_and_the_daemon_runs_on(tmp_path: Path, inbox: Path, emu: Emulator, run_daemon) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    settings = web_settings(tmp_path, inbox, emu, archive=False, listen=f"127.0.0.1:{port}")
    with capture_logs() as logs:
        d = run_daemon(settings)
        write_tone(inbox / "still.wav", 0.5)
        wait_for(lambda: (inbox / "still.wav.analysis.json").exists(), what="the sidecar")
    warning = next(e for e in logs if e["event"] == "web.port_unavailable")
    assert warning["log_level"] == "warning" and f"port {port}" in warning["error"]
    assert d.daemon.web is None
    web = commands.status(settings)["web"]
    assert web["running"] is False and f"port {port} on 127.0.0.1 is already taken" in web["problem"]
    assert f"web page: not running (port {port}" in render(commands.status(settings))
    d.stop()
    assert commands.status(settings)["web"] is None  # no daemon: nothing said about a page
    holder.close()


def test_short_token_is_refused(tmp_path: Path, inbox: Path, emu: Emulator, run_daemon) -> None:
    """A configured token of three characters leaves the daemon running without the page, saying why."""
    settings = web_settings(tmp_path, inbox, emu, archive=False, token="abc")
    with capture_logs() as logs:
        d = run_daemon(settings)
        wait_for(lambda: commands.web_state(settings), what="the page's state")
    assert d.daemon.web is None
    assert "has 3 characters, fewer than 16" in commands.web_state(settings)["problem"]
    assert any(e["event"] == "web.not_started" for e in logs)


def test_non_loopback_needs_a_long_token(tmp_path: Path, inbox: Path, emu: Emulator, run_daemon) -> None:
    """Beyond loopback: a 32-character token, and a warning naming a reachable address and the cleartext."""
    settings = web_settings(tmp_path, inbox, emu, archive=False, listen="0.0.0.0:0", token="a-token-of-twenty-chars")
    with capture_logs() as logs:
        d = run_daemon(settings)
        wait_for(lambda: commands.web_state(settings), what="the page's state")
    assert d.daemon.web is None
    assert "at least 32 characters" in commands.web_state(settings)["problem"]
    assert any(e["event"] == "web.not_started" for e in logs)
    d.stop()
    long_token = "x" * 40
    exposed = web_settings(tmp_path, inbox, emu, archive=False, listen="0.0.0.0:0", token=long_token)
    with capture_logs() as logs:
        d = run_daemon(exposed)
        url = wait_for(lambda: d.daemon.web and d.daemon.web.url)
    warning = next(e for e in logs if e["event"] == "web.exposed")
    port = url.rsplit(":", 1)[1]
    assert warning["log_level"] == "warning" and "cleartext" in warning["next"]
    assert "0.0.0.0" not in warning["url"] and warning["url"].endswith(f":{port}")  # an address a phone can use
    assert url == f"http://127.0.0.1:{port}"
    assert httpx.get(f"http://127.0.0.1:{port}/api/status", headers={"Authorization": f"Bearer {long_token}"})
    assert not any(long_token in json.dumps(e, default=str) for e in logs)
    d.stop()


def test_web_section_defaults() -> None:
    from watcher.config import WebConfig

    cfg = WebConfig()
    assert cfg.enabled is True and cfg.listen == "127.0.0.1:8765" and cfg.token is None
    with pytest.raises(ValueError, match="not host:port"):
        WebConfig(listen="8765")
    assert os.environ["WATCHER_WEB__ENABLED"] == "false"  # the suite's daemons keep the page off by default


# -- the findings, one test each ---------------------------------------------------------------


def test_a_non_utf8_file_name_breaks_no_route(page: Page, inbox: Path, tmp_path: Path) -> None:
    """A dropped file whose name is not UTF-8 is shown (as \\xNN) by every page and API route, none answers 500."""
    audio = inbox / os.fsdecode(b"caf\xe9 \xff.wav")
    write_tone(audio, 0.8)
    shown = str(inbox / "caf\\xe9 \\xff.wav")
    settled(page, Path(shown))
    assert page.client.get("/api/status").status_code == 200
    rows = page.json("/api/files")["files"]
    assert [r["path"] for r in rows] == [shown] and rows[0]["bpm"] is not None  # its sidecar read too
    entry = rows[0]
    assert entry["jobs"]["analyze"]["sidecar"] == shown + ".analysis.json"
    assert "\\xe9" in entry["jobs"]["archive"]["delivery"]
    info = page.json("/api/file", path=shown)
    assert info["path"] == shown and info["state"] == "done"
    assert info["summary"]["bpm"] is not None  # the sidecar was read from its real name
    assert info["sidecar_path"] == shown + ".analysis.json"
    assert info["delivery"]["files"] and all("\\xe9" in f["absolute"] for f in info["delivery"]["files"])
    mastered = next(f["absolute"] for f in info["delivery"]["files"] if f["version"] == "mastered")
    played = page.client.get("/audio", params={"path": mastered})  # in a folder named after the file
    assert played.status_code == 200 and played.headers["content-type"].startswith("audio/")
    html = page.client.get("/file", params={"path": shown})
    assert html.status_code == 200 and "caf\\xe9 \\xff.wav" in html.text
    for url in ("/", "/files", "/api/events"):
        with page.client.stream("GET", url) as r:
            assert r.status_code == 200, url
    assert commands.current_path(page.settings, shown) == str(audio)  # type: ignore[attr-defined]
    retried = page.client.post("/api/retry", json={"paths": [shown]})
    assert retried.status_code == 200


def test_audio_serves_only_audio_as_audio(page: Page, inbox: Path) -> None:
    """Dropped HTML, script, SVG and JSON files are not served by /audio; audio comes as a fixed audio/* type."""
    audio = inbox / "tone.wav"
    write_tone(audio, 0.5)
    settled(page, audio)
    planted = {
        "evil.html": b"<script>fetch('/api/retry')</script>",
        "evil.js": b"fetch('/api/status')",
        "evil.svg": b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>",
        "tone.wav.analysis.json": None,  # the sidecar: through the API only
    }
    for name, content in planted.items():
        if content is not None:
            (inbox / name).write_bytes(content)
        r = page.client.get("/audio", params={"path": str(inbox / name)})
        assert r.status_code == 404 and r.headers["content-type"] == "application/json", name
    r = page.client.get("/audio", params={"path": str(audio)})
    assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
    assert r.headers["x-content-type-options"] == "nosniff"
    (inbox / "evil.wav").symlink_to(inbox / "evil.html")  # named as audio, pointing at HTML
    assert page.client.get("/audio", params={"path": str(inbox / "evil.wav")}).status_code == 404
    disguised = inbox / "evil.mp3"  # script in a file named as audio: served as audio/mpeg, never as script
    disguised.write_bytes(b"fetch('/api/status')")
    r = page.client.get("/audio", params={"path": str(disguised)})
    assert r.headers["content-type"] == "audio/mpeg" and r.headers["x-content-type-options"] == "nosniff"


def test_host_header_must_be_the_pages(tmp_path: Path, inbox: Path, emu: Emulator, run_daemon) -> None:
    """A Host other than the listen address, localhost, 127.0.0.1, [::1] or a configured name is refused (400)
    before the token is even looked at: DNS rebinding reaches nothing, not even /login."""
    settings = web_settings(tmp_path, inbox, emu, archive=False, allowed_hosts=("nas.local", "proxy.example:443"))
    page = Page(run_daemon(settings), settings)
    port = page.port
    for host in ("evil.example", f"evil.example:{port}", "localhost:1", "proxy.example:80", f"127.0.0.2:{port}"):
        for url in ("/login", "/api/status", "/healthz"):
            r = page.client.get(url, headers={"Host": host})
            assert r.status_code == 400 and "allowed_hosts" in r.text, (host, url)
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "nas.local", f"nas.local:{port}",
                 "proxy.example:443"):  # fmt: skip
        assert page.client.get("/api/status", headers={"Host": host}).status_code == 200, host
    page.close()


def test_login_is_rate_limited(page: Page) -> None:
    """After ten failed logins in a minute every token tried waits (429 with Retry-After), even the right one;
    a valid login link (as `watcher web` prints) still lets the user in."""
    started = time.monotonic()
    for i in range(9):
        assert page.anonymous.post("/login", data={"token": f"guess-{i}"}).status_code == 401
    assert page.anonymous.get("/login", params={"nonce": "1.forged.link"}).status_code == 429  # the tenth
    for guess in ("guess", page.token):
        r = page.anonymous.post("/login", data={"token": guess})
        assert r.status_code == 429 and 0 < int(r.headers["retry-after"]) <= 61, guess
        assert "set-cookie" not in r.headers
    assert time.monotonic() - started < 30  # all within the minute
    assert page.anonymous.get(page.login_link()).status_code == 303
    assert page.client.get("/api/status").status_code == 200  # the Bearer token still works


def test_large_deep_or_nul_requests_are_refused_with_4xx(
    page: Page, inbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bodies over 1 MiB are 413 before they are read, one that does not come 408; JSON nested too deep and
    NUL bytes in paths are 4xx."""
    from watcher.web import auth

    monkeypatch.setattr(auth, "BODY_SECONDS", 0.5)
    with socket.create_connection(("127.0.0.1", page.port), timeout=10) as sock:
        sock.sendall(
            f"POST /api/retry HTTP/1.1\r\nHost: 127.0.0.1:{page.port}\r\nAuthorization: Bearer {page.token}\r\n"
            "Content-Type: application/json\r\nContent-Length: 300000000\r\n\r\n{".encode()
        )
        answer = sock.recv(65536).decode()
    assert answer.startswith("HTTP/1.1 413"), answer

    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield b" " * 100_000

    r = page.client.post("/api/retry", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    deep = b"[" * 100_000 + b"]" * 100_000
    assert page.client.post("/api/retry", content=b'{"paths": ' + deep + b"}").status_code == 422
    assert page.client.post("/api/pause", content=b'{"folder": ' + deep + b"}").status_code == 422
    nul = str(inbox / "a\x00.wav")
    for url in ("/audio", "/file", "/api/file"):
        r = page.client.get(url, params={"path": nul})
        assert 400 <= r.status_code < 500, url
    with socket.create_connection(("127.0.0.1", page.port), timeout=30) as sock:  # headers, then no body
        sock.sendall(
            f"POST /api/retry HTTP/1.1\r\nHost: 127.0.0.1:{page.port}\r\nAuthorization: Bearer {page.token}\r\n"
            "Content-Type: application/json\r\nContent-Length: 20\r\n\r\n{".encode()
        )
        assert sock.recv(65536).decode().startswith("HTTP/1.1 408")
    assert page.client.post("/api/retry", json={"paths": [nul]}).status_code == 422
    assert page.client.post("/api/pause", json={"folder": nul}).status_code == 422
    assert page.client.get("/api/status").status_code == 200  # and the page still answers


def test_login_link_is_shown_after_a_taken_port_at_first_start(
    tmp_path: Path, inbox: Path, emu: Emulator, run_daemon
) -> None:
    """The token is made while the port is taken; the next start, with the port free, still logs a login link."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    settings = web_settings(tmp_path, inbox, emu, archive=False, listen=f"127.0.0.1:{port}")
    with capture_logs() as logs:
        run_daemon(settings).stop()
    assert not [e for e in logs if e["event"] == "web.login"]
    assert (settings.state_dir / "web-token").exists()
    holder.close()
    with capture_logs() as logs:
        d = run_daemon(settings)
        page = Page(d, settings)
    login = next(e for e in logs if e["event"] == "web.login")
    assert login["url"].startswith(f"http://127.0.0.1:{port}/login?nonce=")
    assert page.anonymous.get(login["url"]).status_code == 303
    page.close()


def test_refused_requests_leave_the_log_quiet(page: Page, caplog: pytest.LogCaptureFixture) -> None:
    """WebSocket attempts, garbage and over-long headers are answered or closed without a log line each."""
    caplog.set_level(logging.DEBUG)
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", page.port), timeout=10) as sock:
            sock.sendall(
                f"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1:{page.port}\r\nConnection: Upgrade\r\n"
                "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\n"
                "\r\n".encode()
            )
            sock.recv(4096)
        with socket.create_connection(("127.0.0.1", page.port), timeout=10) as sock:
            sock.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
            sock.recv(4096)
        with socket.create_connection(("127.0.0.1", page.port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nX: " + b"a" * 100_000 + b"\r\n\r\n")
            with contextlib.suppress(OSError):
                sock.recv(4096)
    assert page.client.get("/api/status").status_code == 200
    lines = [r for r in caplog.records if r.name.startswith("uvicorn")]
    assert lines == [], [r.getMessage() for r in lines]


def test_pages_escape_what_a_file_name_holds(page: Page, inbox: Path) -> None:
    """A file named like markup is text on its page (the templates escape every value), never markup."""
    audio = inbox / '<img src=x onerror=alert(1)> & "q".wav'
    write_tone(audio, 0.5)
    settled(page, audio)
    html = page.client.get("/file", params={"path": str(audio)}).text
    assert "<img src=x" not in html
    assert "&lt;img src=x onerror=alert(1)&gt; &amp; &#34;q&#34;.wav" in html
    missing = page.client.get("/file", params={"path": "<script>x</script>"})
    assert missing.status_code == 404 and "<script>x" not in missing.text


def test_the_page_says_the_store_is_unreachable_instead_of_waiting_on_it(page: Page, tmp_path: Path) -> None:
    """While the daemon says its store is away (the state folder's outage file, as its guard writes it), the page's
    status says since when and why, and the file list answers 503 naming the outage, at once: neither waits on the
    store. When the daemon says it is back, the page reads the store again."""
    from watcher.fsutil import write_json_atomic
    from watcher.store.away import OUTAGE_FILE

    away = {"unreachable_since": "2026-12-07T22:00:00Z", "error": "connection refused", "next": "retrying in 2 s"}
    outage = tmp_path / "state" / OUTAGE_FILE
    write_json_atomic(outage, away | {"pid": os.getpid()})  # a live process says so
    started = time.monotonic()
    report = page.json("/api/status")
    assert report["store_unreachable"] == away and report["counts"] == {} and report["files"] == []
    listing = page.client.get("/api/files")
    assert listing.status_code == 503 and "unreachable since 2026-12-07T22:00:00Z" in listing.json()["detail"]
    assert time.monotonic() - started < 5
    outage.unlink()
    assert page.json("/api/status")["store_unreachable"] is None
    assert page.client.get("/api/files").status_code == 200


def test_a_page_read_before_the_daemon_opened_its_store_waits_for_it(tmp_path: Path, inbox: Path) -> None:
    """The page starts before the daemon's store exists (a first start, a slow share): a status asked meanwhile
    waits for the store to be opened and answers from it, instead of failing on a store not yet made."""
    import asyncio
    from types import SimpleNamespace

    from watcher.app import open_store
    from watcher.web.api import Context
    from watcher.web.live import LiveEvents

    settings = web_settings(tmp_path, inbox, SimpleNamespace(url="http://127.0.0.1:9"), archive=False)  # type: ignore[arg-type]

    async def go() -> dict:
        opened = asyncio.Event()
        ctx = Context(settings, LiveEvents(), store_open=opened)
        asked = asyncio.ensure_future(ctx.report())
        await asyncio.sleep(0.2)  # sleep-ok: the request must be waiting, not answered, while the store is missing
        assert not asked.done(), "answered before the store was opened"
        await asyncio.to_thread(lambda: open_store(settings).close())  # the daemon makes and migrates it
        opened.set()
        try:
            return await asyncio.wait_for(asked, 10)
        finally:
            ctx.close()

    doc = asyncio.run(go())
    assert "counts" in doc and doc.get("store_unreachable") is None


def test_a_request_that_fails_is_logged_and_answered_with_the_kind_of_error_only() -> None:
    """An unexpected error in a handler: the daemon's log names the request and the error; the answer is a 500
    naming only the kind of error (its text may carry what the page must not show)."""
    import asyncio

    from starlette.applications import Starlette
    from starlette.routing import Route

    from watcher.web.server import _failed

    async def broken(request: object) -> None:
        raise KeyError("secret-ish detail")

    app = Starlette(routes=[Route("/api/status", broken)], exception_handlers={Exception: _failed})

    async def ask() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # the server logs it again, as uvicorn
        async with httpx.AsyncClient(transport=transport, base_url="http://page") as client:
            return await client.get("/api/status")

    with capture_logs() as logs:
        r = asyncio.run(ask())
    assert r.status_code == 500
    assert r.json()["detail"] == "/api/status failed (KeyError); the daemon's log says more; the page asks again"
    assert "secret-ish" not in r.text
    failed = [e for e in logs if e["event"] == "web.request_failed"]
    assert len(failed) == 1 and failed[0]["path"] == "/api/status" and "secret-ish detail" in failed[0]["error"]
