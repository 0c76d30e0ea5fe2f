"""The analysis service fetching audio from a URL (``audio_url_template``) instead of receiving its bytes.

End to end: the daemon, the emulated service and a static server on 127.0.0.1 standing in for the CDN. The
service gets an empty body and an ``audio-url`` header, never both; names map to percent-encoded URLs from
their exact bytes; a folder's own template beats the global one; a URL the CDN cannot serve fails that file
only, with a clear error; copies of one content are still paid once; a token in the query is never shown.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from tests.cdn import StaticServer
from tests.conftest import API_KEY, body, wait_for, write_tone
from tests.test_paid_once import models_asked, sha, sidecar_doc
from tests.test_scopes import problem
from watcher.config import AnalysisConfig, FolderConfig, RetryConfig, Settings, load_settings, secrets_of
from watcher.config.audio_url import check_template, expand, without_query
from watcher.dryrun import dry_run
from watcher.emulator import Emulator, StreamInput
from watcher.errors import ConfigError, RetryLater
from watcher.services.analysis import AnalysisClient
from watcher.services.http import HttpPolicy

pytestmark = pytest.mark.timeout(90)
STREAM = "POST /v1/analysis/stream"
TOKEN = "s3cret-cdn-token"
FAST = RetryConfig(backoff_initial=0.1, backoff_max=0.3, max_attempts=6, needs_user_backoff=60)
# A file's path in its folder -> its path in the URL: each segment percent-encoded from its bytes, "/" kept.
NAMES = {
    "plain.wav": "plain.wav",
    "sub/a b #1 ?%.wav": "sub/a%20b%20%231%20%3F%25.wav",
    "café ñ.wav": "caf%C3%A9%20%C3%B1.wav",
    os.fsdecode(b"bad\xff name.wav"): "bad%FF%20name.wav",
}


@pytest.fixture
def emu():
    with Emulator(analysis_key=API_KEY, use_local=False) as e:
        yield e


def url_settings(
    tmp_path: Path, folders: list[tuple[Path, str | None]], emu_url: str, template: str = ""
) -> Settings:
    """Fast-settling folders (each with its own template, or None to inherit) analysed through the emulator."""
    return Settings(
        state_dir=tmp_path / "state",
        folders=tuple(
            FolderConfig(path=p, settle_seconds=0.3, rescan_interval=3600, audio_url_template=t) for p, t in folders
        ),
        analysis=AnalysisConfig(base_url=emu_url, api_key=API_KEY, audio_url_template=template),
        retry=FAST,
    )


def sidecar_of(audio: Path) -> dict[str, Any]:
    return sidecar_doc(audio)


def complete(audio: Path) -> dict[str, Any]:
    return wait_for(lambda: (d := sidecar_of(audio)).get("complete") and d, what=f"{audio.name}'s sidecar")


def stream_requests(emu: Emulator) -> list[Any]:
    return [r for r in emu.api.requests if r.route == STREAM]


# -- the daemon against the emulator and a CDN -----------------------------------------------------------------


def test_files_are_analysed_through_their_urls_with_no_body(tmp_path, inbox, emu, run_daemon):
    """Four names (spaces, #, ?, %, non-ASCII, bytes that are not UTF-8): each fetched once from its encoded URL,
    every request with an empty body; sidecars name the URL without its query; the token shows nowhere."""
    with StaticServer({"/m": inbox}) as cdn:
        template = f"{cdn.url}/m/{{relpath}}?token={TOKEN}"
        settings = url_settings(tmp_path, [(inbox, None)], emu.url, template)
        with capture_logs() as logs:
            d = run_daemon(settings)
            for n, name in enumerate(NAMES):
                write_tone(inbox / name, 0.3, freq=300 + 40 * n)
            docs = {name: complete(inbox / name) for name in NAMES}
            d.stop()
        fetched = cdn.paths()

    expected = {name: f"{cdn.url}/m/{enc}?token={TOKEN}" for name, enc in NAMES.items()}
    assert sorted(emu.analysis.inputs, key=lambda i: i.url or "") == sorted(
        (StreamInput("audio-url", url, 0, 200) for url in expected.values()), key=lambda i: i.url or ""
    )
    assert fetched == Counter({f"/m/{enc}": 1 for enc in NAMES.values()})
    requests = stream_requests(emu)
    assert len(requests) == len(NAMES)
    assert all(r.headers.get("content-length") == "0" and "content-type" not in r.headers for r in requests)
    assert emu.analysis.bytes_received == 0
    for name, doc in docs.items():
        assert doc["backend"]["input"] == "audio-url"
        assert doc["backend"]["audio_url"] == expected[name].partition("?")[0]
        assert doc["source"]["sha256"] == sha(inbox / name)  # hashed here, fetched there: the same content
        assert emu.paid()[(doc["source"]["sha256"], "analyze:key")] == 1
        assert TOKEN not in (inbox / (name + ".analysis.json")).read_text()
    assert TOKEN not in repr(logs)
    assert any(e["event"] == "analyze.started" and e.get("audio_url") for e in logs)


def test_a_folders_own_template_beats_the_global_one_and_body_sends_bytes(tmp_path, emu, run_daemon):
    """Three folders: one inherits [analysis]'s template, one has its own, one says "body" and sends bytes."""
    inherits, own, plain = tmp_path / "inherits", tmp_path / "own", tmp_path / "plain"
    for p in (inherits, own, plain):
        p.mkdir()
    with StaticServer({"/global": inherits, "/mine/own": own}) as cdn:
        settings = url_settings(
            tmp_path,
            [(inherits, None), (own, f"{cdn.url}/mine/{{folder}}/{{relpath}}"), (plain, "body")],
            emu.url,
            f"{cdn.url}/global/{{relpath}}",
        )
        d = run_daemon(settings)
        write_tone(inherits / "x.wav", 0.3, freq=310)
        write_tone(own / "deep" / "y.wav", 0.3, freq=320)
        z = write_tone(plain / "z.wav", 0.3, freq=330)
        docs = {p.name: complete(p) for p in (inherits / "x.wav", own / "deep" / "y.wav", z)}
        d.stop()
        fetched = cdn.paths()

    assert fetched == Counter({"/global/x.wav": 1, "/mine/own/deep/y.wav": 1})
    assert sorted(emu.analysis.inputs, key=lambda i: (i.kind, i.url or "")) == [
        StreamInput("audio-url", f"{cdn.url}/global/x.wav", 0, 200),
        StreamInput("audio-url", f"{cdn.url}/mine/own/deep/y.wav", 0, 200),
        StreamInput("body", None, z.stat().st_size),
    ]
    assert docs["x.wav"]["backend"]["audio_url"] == f"{cdn.url}/global/x.wav"
    assert docs["y.wav"]["backend"]["audio_url"] == f"{cdn.url}/mine/own/deep/y.wav"
    assert docs["z.wav"]["backend"]["input"] == "body" and "audio_url" not in docs["z.wav"]["backend"]


def test_a_url_the_cdn_cannot_serve_fails_that_file_only(tmp_path, inbox, emu, run_daemon):
    """The CDN answers 404 for one file: the service refuses it (422), that file fails saying which URL and why,
    nothing is billed for it, and the other files, before and after, are analysed."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    with StaticServer({"/m": mirror}) as cdn:
        settings = url_settings(tmp_path, [(inbox, f"{cdn.url}/m/{{relpath}}?token={TOKEN}")], emu.url)
        d = run_daemon(settings)
        write_tone(mirror / "good.wav", 0.3, freq=410)
        shutil.copy(mirror / "good.wav", inbox / "good.wav")
        write_tone(inbox / "lost.wav", 0.3, freq=420)  # never mirrored
        complete(inbox / "good.wav")
        failed = wait_for(lambda: problem(tmp_path, "lost.wav", "analyze"), what="lost.wav failing")
        write_tone(mirror / "later.wav", 0.3, freq=430)  # the service was never paused
        shutil.copy(mirror / "later.wav", inbox / "later.wav")
        complete(inbox / "later.wav")
        d.stop()
        lost_fetches = cdn.paths()["/m/lost.wav"]

    assert failed["error_code"] == "rejected" and failed["state"] == "failed"
    assert "HTTP 422" in failed["error"] and "HTTP 404" in failed["error"]
    assert f"{cdn.url}/m/lost.wav" in failed["error"] and TOKEN not in failed["error"]
    doc = sidecar_of(inbox / "lost.wav")
    assert doc["complete"] is False and "HTTP 404" in doc["errors"][-1]["message"]
    assert TOKEN not in json.dumps(doc)
    lost = sha(inbox / "lost.wav")
    assert not [op for (content, op) in emu.paid() if content == lost]
    assert lost_fetches == failed["attempts"] >= 1  # one fetch per attempt: each re-ask sent the header again


def test_identical_copies_through_urls_are_paid_once(tmp_path, inbox, emu, run_daemon):
    """Two byte-identical copies under a template: one request, one fetch, one charge per model; both sidecars."""
    emu.analysis.faults.event_delay = 0.2  # a stream long enough for the copies to meet
    write_tone(tmp_path / "src.wav", 0.5, freq=350)
    for name in ("a.wav", "b.wav"):
        shutil.copy(tmp_path / "src.wav", tmp_path / name)
    with StaticServer({"/m": inbox}) as cdn:
        d = run_daemon(url_settings(tmp_path, [(inbox, f"{cdn.url}/m/{{relpath}}")], emu.url))
        for name in ("a.wav", "b.wav"):
            os.rename(tmp_path / name, inbox / name)
        docs = [complete(inbox / name) for name in ("a.wav", "b.wav")]
        d.stop()
        fetched = cdn.paths()

    assert models_asked(emu) == {"key": 1, "bpm_degara": 1, "loudness-ebur128": 1}
    assert len(emu.analysis.inputs) == 1 and sum(fetched.values()) == 1
    assert {(content, op) for (content, op), n in emu.paid().items() if n == 1} == {
        (sha(tmp_path / "src.wav"), f"analyze:{m}") for m in ("key", "bpm_degara", "loudness-ebur128")
    }
    assert [doc["backend"]["audio_url"] for doc in docs] == [f"{cdn.url}/m/a.wav", f"{cdn.url}/m/b.wav"]


# -- the client and the emulator --------------------------------------------------------------------------------


@pytest.mark.bill_exempt("the analysis client alone, with no store: no ledger to hold the bill against")
@pytest.mark.usefixtures("gate_stand_in")
def test_a_reask_after_a_dropped_stream_sends_the_header_again(tmp_path, emu):
    """The stream drops after one result; the re-ask (the next call, as the gate's next take makes it) asks only
    for the rest, again by URL, no body."""
    audio = write_tone(tmp_path / "t.wav", 0.3)
    emu.analysis.faults.drop_after = 1
    policy = HttpPolicy(rate_per_second=100, wait_initial=0.01, wait_max=0.02, wait_jitter=0.0)
    seen: list[Any] = []

    async def go() -> Any:
        client = AnalysisClient(emu.url, API_KEY, policy=policy)
        try:
            with pytest.raises(RetryLater):
                await client.analyze(body(audio), ["key", "bpm_degara"], seen.append, audio_url=url)
            rest = [m for m in ["key", "bpm_degara"] if m not in {r.requested for r in seen}]
            return await client.analyze(body(audio), rest, seen.append, audio_url=url)
        finally:
            await client.aclose()

    with StaticServer({"/m": tmp_path}) as cdn:
        url = f"{cdn.url}/m/t.wav"
        asyncio.run(go())
        fetched = cdn.paths()
    assert sorted(r.requested for r in seen) == ["bpm_degara", "key"]
    assert emu.analysis.models_requested == [["key", "bpm_degara"], ["bpm_degara"]]
    assert emu.analysis.inputs == [StreamInput("audio-url", url, 0, 200)] * 2 and fetched == Counter({"/m/t.wav": 2})


@pytest.mark.bill_exempt("the emulator alone, driven by raw HTTP: no watcher, no ledger")
def test_the_emulator_refuses_body_and_url_together_and_unfetchable_urls(tmp_path, emu):
    """Body and URL: 400; a URL that answers 404: 422 with a detail; neither is billed. A URL that works gives
    the results the same bytes give as a body."""
    audio = write_tone(tmp_path / "t.wav", 0.3)
    data = audio.read_bytes()
    headers = {"Authorization": f"Bearer {API_KEY}", "filename": "t.wav"}
    stream = f"{emu.url}/v1/analysis/stream?models=key"
    with StaticServer({"/m": tmp_path}) as cdn:
        both = httpx.post(stream, content=data, headers={**headers, "audio-url": f"{cdn.url}/m/t.wav"})
        missing = httpx.post(stream, headers={**headers, "audio-url": f"{cdn.url}/m/nothing.wav"})
        by_url = httpx.post(stream, headers={**headers, "audio-url": f"{cdn.url}/m/t.wav"})
    by_body = httpx.post(stream, content=data, headers=headers)

    assert both.status_code == 400 and "not both" in both.json()["detail"]
    assert missing.status_code == 422 and "HTTP 404" in missing.json()["detail"]
    assert [i.kind for i in emu.analysis.inputs] == ["both", "audio-url", "audio-url", "body"]
    assert emu.analysis.inputs[1].fetch_status == 404
    assert emu.paid() == Counter({(sha(audio), "analyze:key"): 2})

    def results(response: httpx.Response) -> Any:
        events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
        return [e["result"]["results"] for e in events if e["status"] == "completed"]

    assert results(by_url) == results(by_body) != []


# -- settings, URLs and the dry run -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "why"),
    [
        ("ftp://cdn.example.com/{relpath}", "not an http:// or https:// URL with a host"),
        ("https:///{relpath}", "not an http:// or https:// URL with a host"),
        ("https://cdn.example.com/{path}", "unknown placeholder {path}"),
        ("https://cdn.example.com/{relpath!r}", "unknown placeholder {relpath!r}"),
        ("https://cdn.example.com/{relpath", "is not a valid template"),
        ("https://cdn.example.com/{folder}/", "needs {relpath}"),
        ("https://{folder}.example.com/{relpath}", "placeholder in its host"),
        ("https://user:pw@cdn.example.com/{relpath}", "user:password@"),
        ("https://cdn.example.com/{relpath}#x", "#fragment"),
    ],
)
def test_a_bad_template_is_refused_at_load_naming_its_key(tmp_path, template, why):
    """Each way a template can be wrong stops loading with the key's name and what is wrong."""
    for section, key in (("[analysis]\n", "analysis.audio_url_template"), (None, "folders[0].audio_url_template")):
        config = tmp_path / "config.toml"
        value = json.dumps(template)
        if section:
            config.write_text(f"{section}audio_url_template = {value}\n")
        else:
            config.write_text(f'[[folders]]\npath = "{tmp_path}"\naudio_url_template = {value}\n')
        with pytest.raises(ConfigError) as err:
            load_settings(config, {})
        assert f"{key}: " in str(err.value) and why in str(err.value)


def test_templates_expand_from_exact_bytes_and_hide_their_query(tmp_path):
    """{relpath}, {name} and {folder} encode every byte but the unreserved ones; the query is never shown."""
    template = "https://cdn.example.com:8443/{folder}/{relpath}?n={name}&token=" + TOKEN
    assert check_template(template) == template
    for rel, enc in NAMES.items():
        name = enc.rsplit("/", 1)[-1]
        url = expand(template, "/srv/Hot Folder", rel)
        assert url == f"https://cdn.example.com:8443/Hot%20Folder/{enc}?n={name}&token={TOKEN}"
        assert without_query(url) == f"https://cdn.example.com:8443/Hot%20Folder/{enc}"
    assert expand("http://h/{relpath}", "/srv/in/", "a/b+c=&d.wav") == "http://h/a/b%2Bc%3D%26d.wav"
    config = tmp_path / "config.toml"
    config.write_text(f'[analysis]\naudio_url_template = "{template}"\n')
    assert TOKEN in secrets_of(load_settings(config, {}))  # the log redactor hides it wherever it turns up


def test_the_dry_run_shows_which_input_each_file_would_use(tmp_path, inbox):
    """A folder with a template shows the URL (without its query), one saying "body" shows the bytes."""
    plain = tmp_path / "plain"
    write_tone(inbox / "a b.wav", 0.3, freq=500)
    write_tone(plain / "c.wav", 0.3, freq=510)
    settings = url_settings(
        tmp_path, [(inbox, None), (plain, "body")], "http://127.0.0.1:9", f"https://cdn.example.com/{{relpath}}?t={TOKEN}"
    )
    report = dry_run(settings, [inbox, plain], cached_models=lambda _: set(), answered_operations=lambda _: set())
    inputs = {Path(f.path).name: f.analysis_input for f in report.files}
    assert inputs == {"a b.wav": "audio-url https://cdn.example.com/a%20b.wav", "c.wav": "body"}
    text = report.render()
    assert "input: the service fetches https://cdn.example.com/a%20b.wav" in text
    assert "input: the file's bytes in the request" in text and TOKEN not in text
    local = dry_run(
        settings, [inbox], cached_models=lambda _: set(), answered_operations=lambda _: set(), remote=False
    )
    assert [f.analysis_input for f in local.files] == ["local"]


def test_the_local_backend_ignores_templates_and_says_so_once(tmp_path, inbox):
    """Local analysis reads each file from disk: one warning at start names the templates, without their query."""
    from watcher import local
    from watcher.app import App

    if not local.available():
        pytest.skip("the local extra is not installed")
    analysis = AnalysisConfig(backend="local", audio_url_template=f"https://cdn.example.com/{{relpath}}?t={TOKEN}")
    settings = Settings(state_dir=tmp_path / "state", folders=(FolderConfig(path=inbox),), analysis=analysis)
    with capture_logs() as logs:
        app = App.build(settings)
    asyncio.run(app.aclose())
    ignored = [e for e in logs if e["event"] == "analysis.audio_url_ignored"]
    assert len(ignored) == 1 and ignored[0]["templates"] == ["https://cdn.example.com/{relpath}"]
    assert TOKEN not in repr(logs)
