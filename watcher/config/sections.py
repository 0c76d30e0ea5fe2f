"""The sections of the settings file and the value types they share; each validates its own keys."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    field_validator,
)

from watcher.config.audio_url import check_template
from watcher.versions import TRACK_VERSIONS

APP = "watcher"
AUDIO_PATTERNS = (
    "*.wav",
    "*.wave",
    "*.flac",
    "*.mp3",
    "*.m4a",
    "*.aif",
    "*.aiff",
    "*.aifc",
    "*.ogg",
    "*.oga",
)
DEFAULT_MODELS = ("key", "bpm_degara", "loudness-ebur128")


def _blank_is_none(value: Any) -> Any:
    """An empty string in TOML or the environment means "not set"."""
    return None if value in ("", None) else value


def _absolute(value: Path) -> Path:
    """A path with ``~`` expanded, made absolute (never resolved: links are the user's business)."""
    return Path(os.path.abspath(value.expanduser()))


AbsolutePath = Annotated[Path, AfterValidator(_absolute)]
OptionalPath = Annotated[AbsolutePath | None, BeforeValidator(_blank_is_none)]
OptionalFile = Annotated[Path | None, BeforeValidator(_blank_is_none)]  # a file the user names, kept as given
OptionalSecret = Annotated[SecretStr | None, BeforeValidator(_blank_is_none)]


SEND_BODY = "body"  # audio_url_template's value that says "send the file's bytes", whatever [analysis] says


def _url_template(value: str | None) -> str | None:
    """An audio URL template, checked once; ``"body"`` is kept as it is."""
    if value is None:
        return None
    value = value.strip()
    return check_template(value) if value and value != SEND_BODY else value


def _service_url(value: str) -> str:
    """A service's base URL: http(s) with a host and a valid port, checked when the settings load (the HTTP
    client that would refuse it is made only at the first request)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value.strip())
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0-65535
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a usable URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an http:// or https:// URL with a host")
    return value


ServiceURL = Annotated[str, AfterValidator(_service_url)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Keyed(_Section):
    """A service section whose API key may come from several places; it remembers which (for messages)."""

    _key_source: str = PrivateAttr("")

    @property
    def key_source(self) -> str:
        """Where the key came from, e.g. "the environment variable ESSENTIA_API_KEY" (never the key)."""
        return self._key_source or "the config"

    def with_key(self, key: SecretStr | None, source: str) -> Any:
        """A copy holding the resolved ``key`` and naming its ``source``."""
        new = self.model_copy(update={"api_key": key})
        new._key_source = source
        return new


class FolderConfig(_Section):
    """One watched folder and how files in it become work."""

    path: AbsolutePath
    recursive: bool = True
    poll: bool | Literal["auto"] = "auto"
    poll_interval: float = Field(10.0, gt=0)
    settle_seconds: float = Field(5.0, ge=0)
    # Claim order (see watcher.store.lanes): a higher priority goes first; a file a scan finds that was modified
    # within live_hours counts as today's (live), not backlog, so a restart does not demote today's session.
    priority: int = 0
    live_hours: float = Field(12.0, ge=0)
    rescan_interval: float = Field(3600.0, gt=0)
    include: tuple[str, ...] = AUDIO_PATTERNS
    exclude: tuple[str, ...] = ()
    # Archive options for this folder; unset means "as in [archive]".
    output_dir: OptionalPath = None
    done_dir: OptionalPath = None
    failed_dir: OptionalPath = None
    # The analysis service fetches this folder's files from this URL; unset or "": as in [analysis]; "body": send
    # the files' bytes.
    audio_url_template: Annotated[str | None, BeforeValidator(_blank_is_none), AfterValidator(_url_template)] = None


class AnalysisConfig(_Keyed):
    """The analysis service (Essentia API) and which models to ask for."""

    enabled: bool = True
    backend: Literal["auto", "remote", "local"] = "auto"
    base_url: ServiceURL = "https://api.essentia.upf.edu"
    api_key: OptionalSecret = None
    api_key_file: OptionalFile = None
    models: tuple[str, ...] = DEFAULT_MODELS
    # Little's law: concurrent requests = rate x time of one request. A 3-minute track takes about 3.3 s to
    # analyse (Essentia's own figures on 2 cores: 1.7 s for 30 s of audio, 4.1-5.2 s for 5 minutes) plus about
    # 1 s to send, so about 4 s; at 10 requests/s that is 40 concurrent requests. (The emulator answers in about 10 ms.)
    concurrency: int = Field(40, ge=1, le=64, description="concurrent requests: rate_limit x seconds per request")
    rate_limit: float = Field(
        10.0, gt=0, description="requests per second at most (the service's documented 10/s); halved on a 429"
    )
    timeout: float = Field(300.0, gt=0, description="seconds to wait for the next event of a stream")
    local_workers: int = Field(1, ge=1, le=32, description="processes for the local backend")
    local_max_seconds: float = Field(14400.0, gt=0, description="longest file the local backend decodes")
    daily_audio_minutes: float = Field(0.0, ge=0, description="audio minutes a UTC day may send (0: no cap)")
    audio_url_template: Annotated[str, AfterValidator(_url_template)] = Field(
        "", description="the service fetches each file from this URL instead of receiving it (remote backend only)"
    )

    @field_validator("models")
    @classmethod
    def _models(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        cleaned = tuple(m.strip() for m in value if m.strip())
        if not cleaned:
            raise ValueError("at least one model is needed")
        for m in cleaned:
            name, _, version = m.partition(":")
            if not name or (":" in m and not version) or "," in m:
                raise ValueError(f"{m!r} is not a model name or name:version")
        if len(set(cleaned)) != len(cleaned):
            raise ValueError("a model is listed twice")
        return cleaned


ArchiveVersion = Literal[
    "original", "restored", "mastered", "original_stems", "restored_stems", "mastered_stems", "stems"
]
AudioFormat = Literal["wav", "flac", "mp3", "m4a"]
OptionalFormat = Annotated[AudioFormat | None, BeforeValidator(_blank_is_none)]


class ArchiveConfig(_Keyed):
    """The processing service (Neural Analog): which versions to make and where they are delivered."""

    enabled: bool = False
    base_url: ServiceURL = "https://api.neuralanalog.com"
    api_key: OptionalSecret = None
    api_key_file: OptionalFile = None
    versions: tuple[ArchiveVersion, ...] = ("original", "mastered")
    stems_from: Literal["original", "restored", "mastered"] = "original"
    format: AudioFormat = "wav"
    original_format: OptionalFormat = None
    restored_format: OptionalFormat = None
    mastered_format: OptionalFormat = None
    output_dir: OptionalPath = None
    # Little's law again: polls and version requests take about 0.25 s each (up to 10/s: 2.5 concurrent requests), and
    # uploads and downloads are bound by the link, which two or three transfers fill; 8 covers both.
    concurrency: int = Field(8, ge=1, le=64, description="concurrent requests: rate_limit x seconds per request")
    # The service documents no limit: 10/s as its sibling's, and the adaptive rate finds a lower one (a 429
    # halves it, and costs nothing: nothing was done). Status polls never take more than half of it.
    rate_limit: float = Field(10.0, gt=0, description="requests per second at most; halved on a 429")
    timeout: float = Field(300.0, gt=0)
    poll_initial: float = Field(5.0, gt=0, description="seconds before the first status poll")
    poll_max: float = Field(300.0, gt=0, description="the longest pause between two polls")
    max_archive_bytes: int = Field(20 * 2**30, gt=0, description="uncompressed size a zip may hold")
    max_archive_entries: int = Field(1000, gt=0)
    daily_audio_minutes: float = Field(0.0, ge=0, description="audio minutes a UTC day may send (0: no cap)")
    in_doubt: Literal["hold", "resend"] = Field("hold", description="a paid request whose answer was lost")
    restore: dict[str, Any] = Field(default_factory=dict)
    master: dict[str, Any] = Field(default_factory=dict)
    stems: dict[str, Any] = Field(default_factory=lambda: {"preset": "4_tracks"})

    @field_validator("versions")
    @classmethod
    def _versions(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one version is needed")
        if len(set(value)) != len(value):
            raise ValueError("a version is listed twice")
        return value

    def wanted(self) -> tuple[str, ...]:
        """The versions to deliver, with ``"stems"`` expanded to ``<stems_from>_stems``."""
        out: list[str] = []
        for v in self.versions:
            name = f"{self.stems_from}_stems" if v == "stems" else str(v)
            if name not in out:
                out.append(name)
        return tuple(out)

    def format_of(self, version: str) -> str:
        """The file format asked for a track version (stems use ``format``)."""
        specific = getattr(self, f"{version}_format", None) if version in TRACK_VERSIONS else None
        return specific or self.format


class SidecarConfig(_Section):
    """Where the JSON results go."""

    suffix: str = ".analysis.json"
    directory: OptionalPath = None

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value: str) -> str:
        if not value or "/" in value or "\\" in value:
            raise ValueError("must be a non-empty file name suffix such as '.analysis.json'")
        return value


class RetryConfig(_Section):
    """How the store schedules another attempt after a transient failure."""

    max_attempts: int = Field(8, ge=1)
    backoff_initial: float = Field(30.0, gt=0)
    backoff_max: float = Field(3600.0, gt=0)
    needs_user_backoff: float = Field(900.0, gt=0, description="pause after a bad key or no credits")


class StoreConfig(_Section):
    """The durable store: SQLite under state_dir, or (``url``) one PostgreSQL database several machines share."""

    retention_days: float = Field(90.0, gt=0, description="forget replaced and deleted revisions after this long")
    url: str = Field("", description="postgresql://USER@HOST:PORT/DB (libpq); empty keeps SQLite under state_dir")
    node_name: str = Field(default_factory=socket.gethostname, min_length=1, description="this machine, in status")
    passfile: Path | None = Field(None, description="libpq password file (else PGPASSFILE or the pgpass credential)")
    lease_seconds: float = Field(60.0, ge=2, description="shared store: a dead node's work is taken over after this")

    @field_validator("node_name", mode="before")
    @classmethod
    def _default_node(cls, value: Any) -> Any:
        return socket.gethostname() if value in ("", None) else value

    @field_validator("passfile", mode="before")
    @classmethod
    def _blank_passfile(cls, value: Any) -> Any:
        return None if value in ("", None) else value

    @field_validator("url")
    @classmethod
    def _pg_url(cls, value: str) -> str:
        value = value.strip()
        if value and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL (or empty for SQLite under state_dir)")
        if value:
            from urllib.parse import urlsplit

            if urlsplit(value).password or "password=" in value:
                raise ValueError("must not carry the password: put it in a passfile ([store] passfile or PGPASSFILE)")
        return value


class MetricsConfig(_Section):
    """The optional Prometheus endpoint."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(9464, ge=0, le=65535)


class WebConfig(_Section):
    """The local web page and JSON API (served inside the daemon)."""

    enabled: bool = True
    listen: str = Field("127.0.0.1:8765", description="host:port; a non-loopback host needs a token of 32+ characters")
    token: SecretStr | None = None
    token_file: Path | None = None  # default: a random token kept in state_dir/web-token (mode 0600)
    allowed_hosts: tuple[str, ...] = Field(
        (),
        description="Host names (name or name:port) the page answers to besides the listen address, localhost, "
        "127.0.0.1 and [::1]: a LAN name, a container's or a reverse proxy's",
    )

    @field_validator("token", "token_file", mode="before")
    @classmethod
    def _blank_token(cls, value: Any) -> Any:
        return None if value in ("", None) else value

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for host in value:
            if not host or any(c in host for c in "/@ ,\t") or "://" in host:
                raise ValueError(f"{host!r} is not a host name (give nas.local or nas.local:8765, no scheme or path)")
        return tuple(h.lower() for h in value)

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{value!r} is not host:port (for example 127.0.0.1:8765)")
        return value


class ControlConfig(_Section):
    """The daemon's control socket (``state_dir/control.sock``), through which the commands reach it."""

    group: str | None = Field(None, description="give the socket to this group (the daemon must be in it)")
    mode: int = Field(0o660, ge=0, le=0o777, description="the socket's permission bits (connecting needs write)")
    confirm_backfill_minutes: float = Field(
        60.0, ge=0, description="a back-fill sending more audio minutes than this waits for `watcher backfill --yes`"
    )

    @field_validator("group", mode="before")
    @classmethod
    def _blank_group(cls, value: Any) -> Any:
        return None if value in ("", None) else value


class WebhooksConfig(_Section):
    """Optional JSON POSTs when a file is done or failed."""

    urls: tuple[str, ...] = ()
    events: tuple[Literal["file.done", "file.failed", "file.in_doubt", "spend.capped"], ...] = (
        "file.done",
        "file.failed",
        "file.in_doubt",
        "spend.capped",
    )
    secret: OptionalSecret = None
    timeout: float = Field(10.0, gt=0)

    @field_validator("urls")
    @classmethod
    def _urls(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for url in value:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r} is not an http(s) URL")
        return value
