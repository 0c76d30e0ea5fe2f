"""Shared by the web page's tests: a real daemon with the page on a free loopback port, and the emulator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from tests.conftest import API_KEY, make_settings, wait_for
from tests.test_archive import PKEY, archive_settings
from watcher.config import Settings, WebConfig
from watcher.emulator import Emulator
from watcher.web.auth import login_link


def web_settings(tmp_path: Path, inbox: Path, emu: Emulator, *, archive: bool = True, **web: Any) -> Settings:
    """One fast folder analysed (and, ``archive``, archived as original + mastered) through the emulator."""
    web.setdefault("listen", "127.0.0.1:0")
    settings = (
        archive_settings(tmp_path, inbox, emu, versions=("original", "mastered"))
        if archive
        else make_settings(tmp_path, inbox, emu.url)
    )
    return settings.model_copy(update={"web": WebConfig(enabled=True, **web)})


def new_emulator(*, use_local: bool = False) -> Emulator:
    """Both services on a free loopback port, with the keys ``web_settings`` sends; archives ready at once."""
    emu = Emulator(analysis_key=API_KEY, processing_key=PKEY, use_local=use_local).start()
    emu.processing.faults.polls_needed = 1
    return emu


class Page:
    """The page of a running test daemon: its URL, its token, and an authorised HTTP client."""

    def __init__(self, daemon: Any, settings: Settings) -> None:
        self.daemon = daemon
        self.url: str = wait_for(lambda: daemon.daemon.web and daemon.daemon.web.url, what="the page to listen")
        self.token = (settings.state_dir / "web-token").read_text().strip()
        self.client = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=10)
        self.anonymous = httpx.Client(base_url=self.url, timeout=10)
        self.port = int(self.url.rsplit(":", 1)[1])
        self.cookie = f"watcher_session_{self.port}"

    def login_link(self) -> str:
        """A fresh one-time login link, as `watcher web` prints."""
        return login_link(self.url, self.token)

    def session(self) -> httpx.Client:
        """A client logged in through a login link, as a browser is (a session cookie, no token)."""
        client = httpx.Client(base_url=self.url, timeout=10)
        r = client.get(self.login_link())
        assert r.status_code == 303, r.text
        return client

    def json(self, url: str, **params: Any) -> Any:
        r = self.client.get(url, params=params)
        assert r.status_code == 200, r.text
        return r.json()

    def close(self) -> None:
        self.client.close()
        self.anonymous.close()
