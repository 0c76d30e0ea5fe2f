"""The page in a real headless Chromium (Debian's chromium and chromedriver, driven by Selenium) against a real
daemon and the emulator. Screenshots of every page go to a temp folder (printed), or to $WEB_SCREENSHOTS."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.webutil import Page, new_emulator, web_settings
from watcher.emulator import Emulator

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)",
)
SHOTS = Path(os.environ.get("WEB_SCREENSHOTS") or Path(tempfile.gettempdir()) / "watcher-web-screenshots")
STREAM = "POST /v1/analysis/stream"
AXE = "axe-core@4.14.1"  # the accessibility checker, from the npm registry


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="watcher-chromium-")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--mute-audio",
        "--autoplay-policy=no-user-gesture-required",
        "--window-size=1200,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_script_timeout(20)
    SHOTS.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots: {SHOTS}")
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def emu() -> Iterator[Emulator]:
    from watcher import local

    e = new_emulator(use_local=local.available())  # real loudness curves to plot where Essentia is here
    yield e
    e.stop()


def drop(path: Path, seconds: float = 4.0) -> Path:
    """Music with a beat (A minor chords over a 120 BPM click), so that local analysis finds key and tempo."""
    from tests.audiogen import chord_progression, click_track, write_wav

    chords = chord_progression(seconds / 8, 2, tonic="A", scale="minor")
    clicks = click_track(120, len(chords) / 44100)
    tmp = write_wav(path.parent / f".{path.name}.part", 0.6 * chords + 0.5 * clicks[: len(chords)])
    return tmp.replace(path)  # whole, so the detector never sees a half-written file


def open_page(run_daemon: Any, settings: Any, browser: Any) -> Page:
    """Start the daemon and log the browser in with a login link."""
    page = Page(run_daemon(settings), settings)
    browser.get(page.login_link())
    wait_for(lambda: browser.current_url == f"{page.url}/", what="the login redirect")
    return page


def shot(browser: Any, name: str) -> None:
    browser.save_screenshot(str(SHOTS / f"{name}.png"))


def js(browser: Any, script: str, *args: Any) -> Any:
    return browser.execute_script(script, *args)


def text_of(browser: Any, element_id: str) -> str | None:
    """An element's text read in one script call, so a page reloading meanwhile cannot make it stale."""
    from selenium.common.exceptions import WebDriverException

    try:
        return js(browser, "const e = document.getElementById(arguments[0]); return e ? e.textContent : null;",
                  element_id)
    except WebDriverException:  # the page was between two documents: ask again
        return None


def row_state(browser: Any, path: Path) -> str | None:
    return js(
        browser,
        "const r = [...document.querySelectorAll('#files tbody tr')].find(r => r.dataset.path === arguments[0]);"
        "return r ? r.dataset.state : null;",
        str(path),
    )


def test_login_link_logs_in_and_logout_ends_the_session(
    tmp_path: Path, inbox: Path, emu: Emulator, run_daemon: Any, browser: Any
) -> None:
    """The login link opens a session (an HttpOnly, Strict cookie named for the port); Log out ends it."""
    settings = web_settings(tmp_path, inbox, emu)
    page = Page(run_daemon(settings), settings)
    browser.delete_all_cookies()
    browser.get(f"{page.url}/")
    assert "log in with the link" in browser.find_element("tag name", "body").text
    browser.get(page.login_link())
    wait_for(lambda: browser.current_url == f"{page.url}/")
    assert browser.title == "Overview · watcher"
    wait_for(lambda: text_of(browser, "live") == "live", what="the event stream")
    cookie = browser.get_cookie(page.cookie)
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict" and cookie["value"] != page.token
    assert cookie.get("expiry") and cookie["expiry"] - time.time() <= 12 * 3600 + 60
    assert js(browser, "return document.cookie") == ""  # HttpOnly: scripts cannot read it
    browser.find_element("css selector", "form.logout button").click()
    wait_for(lambda: browser.current_url == f"{page.url}/login", what="the login form after Log out")
    assert browser.get_cookie(page.cookie) is None
    browser.add_cookie({"name": page.cookie, "value": cookie["value"], "path": "/"})  # kept by someone
    browser.get(f"{page.url}/api/status")
    assert "log in with the link" in browser.find_element("tag name", "body").text  # revoked on the server
    browser.get(f"{page.url}/login")
    browser.find_element("id", "token").send_keys(page.token)
    browser.find_element("css selector", "form.login button").click()
    wait_for(lambda: browser.current_url == f"{page.url}/", what="the form's login")
    page.close()


def axe_script() -> str:
    """axe-core's axe.min.js, fetched once with `npm pack` into a cache folder (skip when npm cannot)."""
    cache = Path(os.environ.get("WATCHER_TEST_CACHE") or Path.home() / ".cache" / "watcher-tests") / AXE
    script = cache / "axe.min.js"
    if not script.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("needs npm to fetch axe-core")
        with tempfile.TemporaryDirectory() as tmp:
            packed = subprocess.run(
                [npm, "pack", AXE, "--pack-destination", tmp], capture_output=True, text=True, timeout=120
            )
            if packed.returncode != 0:
                pytest.skip(f"npm pack {AXE} failed: {packed.stderr.strip()[-200:]}")
            with tarfile.open(Path(tmp) / packed.stdout.strip().splitlines()[-1]) as tar:
                member = tar.extractfile("package/axe.min.js")
                assert member is not None
                cache.mkdir(parents=True, exist_ok=True)
                partial = cache / "axe.min.js.part"
                partial.write_bytes(member.read())
                partial.replace(script)
    return script.read_text()


def serious_violations(browser: Any) -> list[str]:
    """axe-core's serious and critical violations on the open page, one line each."""
    if not js(browser, "return typeof window.axe !== 'undefined'"):
        js(browser, axe_script())
    result = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "axe.run(document, {resultTypes: ['violations']}).then(r => done(r.violations), e => done(String(e)));"
    )
    assert isinstance(result, list), result
    return [
        f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:3]}"
        for v in result
        if v["impact"] in ("serious", "critical")
    ]


def test_pages_have_no_serious_accessibility_violation(
    tmp_path: Path, inbox: Path, emu: Emulator, run_daemon: Any, browser: Any
) -> None:
    """axe-core finds no serious or critical violation on the overview, the file list and a file's page (one of
    the files has a name that is not UTF-8: both lists still fill in)."""
    settings = web_settings(tmp_path, inbox, emu)
    page = open_page(run_daemon, settings, browser)
    audio = inbox / "Checked.wav"
    drop(audio)
    odd = drop(inbox / os.fsdecode(b"Caf\xe9.wav"))
    shown = Path(str(inbox / "Caf\\xe9.wav"))  # as the page shows it
    for path in (audio, shown):
        wait_for(lambda p=path: row_state(browser, p) == "done", timeout=40, what=f"{path.name} to be delivered")
    found = {"overview": serious_violations(browser)}
    browser.get(f"{page.url}/files")
    wait_for(lambda: row_state(browser, audio) == "done" and row_state(browser, shown) == "done")
    assert odd.exists()
    found["files"] = serious_violations(browser)
    browser.get(f"{page.url}/file?path={audio}")
    wait_for(lambda: browser.find_elements("css selector", "#players audio"), what="the players")
    found["file"] = serious_violations(browser)
    dark = [{"name": "prefers-color-scheme", "value": "dark"}]
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": dark})
    try:
        found["file, dark"] = serious_violations(browser)
    finally:
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
    assert found == {"overview": [], "files": [], "file": [], "file, dark": []}
    page.close()


@pytest.mark.serial  # it measures the sidecar-to-row latency: alone, not beside the parallel suite
def test_overview_shows_a_dropped_file_moving_to_done_without_reload(
    tmp_path: Path, inbox: Path, emu: Emulator, run_daemon: Any, browser: Any
) -> None:
    """The row appears and turns done from the event stream alone; prints sidecar-to-row latency."""
    settings = web_settings(tmp_path, inbox, emu, archive=False)
    page = open_page(run_daemon, settings, browser)
    wait_for(lambda: text_of(browser, "live") == "live", what="the event stream")
    js(
        browser,
        """window.notReloaded = true; window.doneAt = null;
        new MutationObserver(() => {
          const r = [...document.querySelectorAll('#files tbody tr')].find(r => r.dataset.path === arguments[0]);
          if (r && r.dataset.state === 'done' && !window.doneAt) window.doneAt = Date.now();
        }).observe(document.querySelector('#files tbody'), {childList: true, subtree: true});""",
        str(inbox / "drop.wav"),
    )
    drop(inbox / "drop.wav")
    wait_for(lambda: row_state(browser, inbox / "drop.wav") is not None, what="the row to appear")
    wait_for(lambda: row_state(browser, inbox / "drop.wav") == "done", timeout=30, what="the row to turn done")
    assert js(browser, "return window.notReloaded") is True
    sidecar = inbox / "drop.wav.analysis.json"
    latency = js(browser, "return window.doneAt") / 1000 - sidecar.stat().st_mtime
    print(f"\nsidecar written -> row done on the open page: {latency * 1000:.0f} ms")
    assert 0 <= latency < 2.0
    shot(browser, "overview")
    browser.get(f"{page.url}/files")
    wait_for(lambda: row_state(browser, inbox / "drop.wav") == "done")
    browser.find_element("name", "q").send_keys("nothing-matches")
    browser.find_element("css selector", "#filters button").click()
    wait_for(lambda: text_of(browser, "total") == "0 file(s)", what="the filter")
    browser.find_element("name", "q").clear()
    browser.find_element("css selector", "#filters button").click()
    wait_for(lambda: text_of(browser, "total") == "1 file(s)", what="the filter cleared")
    shot(browser, "files")
    page.close()


def test_file_page_plots_loudness_and_plays_a_delivered_version(
    tmp_path: Path, inbox: Path, emu: Emulator, run_daemon: Any, browser: Any
) -> None:
    settings = web_settings(tmp_path, inbox, emu)
    page = open_page(run_daemon, settings, browser)
    audio = inbox / "Track One.wav"
    drop(audio, 8.0)
    wait_for(lambda: row_state(browser, audio) == "done", timeout=40, what="the file to be delivered")
    browser.find_element("link text", str(audio)).click()
    wait_for(lambda: "/file?path=" in browser.current_url)
    sidecar = json.loads((inbox / "Track One.wav.analysis.json").read_text())
    momentary = sidecar["models"]["loudness_ebur128"]["results"]["momentaryLoudness"][0]
    plot = browser.find_element("css selector", "#loudness-plot polyline[data-series=momentary]")
    size = plot.size
    assert size["width"] > 100 and size["height"] > 0
    assert js(browser, "return arguments[0].points.numberOfItems", plot) == len(momentary)
    beats = sidecar["models"]["bpm_degara"]["results"]["beat_positions"]
    assert len(browser.find_elements("css selector", "#loudness-plot .beats line")) == len(beats)
    bpm = sidecar["models"]["bpm_degara"]["results"]["bpm"]
    assert browser.find_element("id", "bpm").text == f"{bpm:.1f} BPM"
    players = browser.find_elements("css selector", "#players audio")
    assert len(players) >= 2
    js(browser, "arguments[0].play()", players[0])
    wait_for(lambda: js(browser, "return arguments[0].readyState", players[0]) >= 2, what="the audio to play")
    assert js(browser, "return arguments[0].error", players[0]) is None
    shot(browser, "file")
    page.close()


def test_retry_button_on_a_failed_file_sends_it_again(
    tmp_path: Path, inbox: Path, emu: Emulator, run_daemon: Any, browser: Any
) -> None:
    settings = web_settings(tmp_path, inbox, emu, archive=False)
    page = open_page(run_daemon, settings, browser)
    emu.analysis.faults.reject_models = {"key"}
    audio = inbox / "refused.wav"
    drop(audio)
    wait_for(lambda: row_state(browser, audio) == "failed", timeout=30, what="the file to fail")
    shot(browser, "overview-failure")
    browser.get(f"{page.url}/file?path={audio}")
    assert "unknown model: key" in browser.find_element("id", "jobs").text
    shot(browser, "file-failed")
    sent = emu.api.counts()[STREAM]
    emu.analysis.faults.reject_models = set()
    browser.find_element("id", "retry").click()
    wait_for(lambda: emu.api.counts()[STREAM] == sent + 1, what="a new request to the service")
    wait_for(lambda: text_of(browser, "state") == "done", timeout=20, what="the page to show done")
    page.close()


def test_cross_origin_post_is_refused_in_the_browser(
    tmp_path: Path, inbox: Path, emu: Emulator, run_daemon: Any, browser: Any
) -> None:
    """Another origin on the same host (same site: the Strict cookie goes along) cannot pause a folder."""
    settings = web_settings(tmp_path, inbox, emu, archive=False)
    page = open_page(run_daemon, settings, browser)
    browser.get(f"{emu.url}/elsewhere")  # another origin: the emulator's port
    result = browser.execute_async_script(
        """const done = arguments[arguments.length - 1];
        fetch(arguments[0] + '/api/pause', {method: 'POST', credentials: 'include', mode: 'no-cors',
          headers: {'Content-Type': 'text/plain'}, body: JSON.stringify({folder: arguments[1]})})
          .then(r => done('sent ' + r.type), e => done('error ' + e));""",
        page.url,
        str(inbox),
    )
    assert result == "sent opaque"
    assert page.json("/api/status")["folders"][0]["paused"] is False
    browser.get(f"{page.url}/")
    wait_for(lambda: browser.find_elements("css selector", "#folders tbody button"), what="the folder row")
    browser.find_element("css selector", "#folders tbody button").click()  # this page's own origin: allowed
    wait_for(lambda: page.json("/api/status")["folders"][0]["paused"] is True, what="the pause")
    page.close()


def test_screens_on_a_phone(tmp_path: Path, inbox: Path, emu: Emulator, run_daemon: Any, browser: Any) -> None:
    """The overview fits a phone's width without sideways scrolling."""
    settings = web_settings(tmp_path, inbox, emu, archive=False)
    page = open_page(run_daemon, settings, browser)
    drop(inbox / "phone.wav")
    wait_for(lambda: row_state(browser, inbox / "phone.wav") == "done", timeout=30)
    browser.set_window_size(390, 844)
    try:
        time_limit = time.monotonic() + 5
        wait_for(lambda: js(browser, "return window.innerWidth") <= 400 or time.monotonic() > time_limit)
        assert js(browser, "return document.documentElement.scrollWidth <= window.innerWidth + 1") is True
        shot(browser, "overview-phone")
    finally:
        browser.set_window_size(1200, 1000)
    page.close()
