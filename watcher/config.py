"""Settings: a TOML file, overridden by ``WATCHER_...`` environment variables, resolved once into frozen objects.

The file is found by ``--config PATH``, else ``$WATCHER_CONFIG``, else the platform's config folder; no file at
all is fine. Unknown keys and bad values raise :class:`ConfigError` naming the key. API keys are resolved here
(config, key file, ``ESSENTIA_API_KEY``/``NEURALANALOG_API_KEY``, systemd credentials) and travel as SecretStr.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import platformdirs
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from watcher.errors import ConfigError
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


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FolderConfig(_Section):
    """One watched folder and how files in it become work."""

    path: AbsolutePath
    recursive: bool = True
    poll: bool | Literal["auto"] = "auto"
    poll_interval: float = Field(10.0, gt=0)
    settle_seconds: float = Field(5.0, ge=0)
    rescan_interval: float = Field(3600.0, gt=0)
    include: tuple[str, ...] = AUDIO_PATTERNS
    exclude: tuple[str, ...] = ()
    # Archive options for this folder; unset means "as in [archive]".
    output_dir: OptionalPath = None
    done_dir: OptionalPath = None
    failed_dir: OptionalPath = None


class AnalysisConfig(_Section):
    """The analysis service (Essentia API) and which models to ask for."""

    enabled: bool = True
    backend: Literal["auto", "remote", "local"] = "auto"
    base_url: str = "https://api.essentia.upf.edu"
    api_key: OptionalSecret = None
    api_key_file: OptionalFile = None
    models: tuple[str, ...] = DEFAULT_MODELS
    concurrency: int = Field(2, ge=1, le=64)
    rate_limit: float = Field(5.0, gt=0, description="requests per second, below the service's 10/s")
    timeout: float = Field(300.0, gt=0, description="seconds to wait for the next event of a stream")
    local_workers: int = Field(1, ge=1, le=32, description="processes for the local backend")
    local_max_seconds: float = Field(14400.0, gt=0, description="longest file the local backend decodes")
    daily_audio_minutes: float = Field(0.0, ge=0, description="audio minutes a UTC day may send (0: no cap)")

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


class ArchiveConfig(_Section):
    """The processing service (Neural Analog): which versions to make and where they are delivered."""

    enabled: bool = False
    base_url: str = "https://api.neuralanalog.com"
    api_key: OptionalSecret = None
    api_key_file: OptionalFile = None
    versions: tuple[ArchiveVersion, ...] = ("original", "mastered")
    stems_from: Literal["original", "restored", "mastered"] = "original"
    format: AudioFormat = "wav"
    original_format: OptionalFormat = None
    restored_format: OptionalFormat = None
    mastered_format: OptionalFormat = None
    output_dir: OptionalPath = None
    concurrency: int = Field(2, ge=1, le=64)
    rate_limit: float = Field(5.0, gt=0)
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

    retention_days: float = Field(90.0, gt=0, description="forget replaced and deleted versions after this long")
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

    @field_validator("token", "token_file", mode="before")
    @classmethod
    def _blank_token(cls, value: Any) -> Any:
        return None if value in ("", None) else value

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{value!r} is not host:port (for example 127.0.0.1:8765)")
        return value


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


class Settings(BaseSettings):
    """All of watcher's settings; frozen once loaded."""

    model_config = SettingsConfigDict(
        env_prefix="WATCHER_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    state_dir: AbsolutePath = Field(default_factory=lambda: Path(platformdirs.user_state_dir(APP)))
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    folders: tuple[FolderConfig, ...] = ()
    analysis: AnalysisConfig = AnalysisConfig()
    sidecar: SidecarConfig = SidecarConfig()
    archive: ArchiveConfig = ArchiveConfig()
    retry: RetryConfig = RetryConfig()
    store: StoreConfig = StoreConfig()
    metrics: MetricsConfig = MetricsConfig()
    webhooks: WebhooksConfig = WebhooksConfig()
    web: WebConfig = WebConfig()

    @model_validator(mode="after")
    def _archive_needs_an_output(self) -> Settings:
        """With the archive on, every folder needs somewhere to deliver: its own output_dir or the archive's."""
        if self.archive.enabled and self.archive.output_dir is None:
            missing = [str(f.path) for f in self.folders if f.output_dir is None]
            if missing:
                raise ValueError(
                    "archive.output_dir: required when the archive is enabled (or set output_dir on each "
                    f"[[folders]] entry; missing for {', '.join(missing)})"
                )
        return self

    def output_dir_for(self, folder: FolderConfig) -> Path | None:
        """Where a folder's deliveries go: its own output_dir, else the archive's."""
        return folder.output_dir or self.archive.output_dir

    def folder_for(self, path: Path) -> FolderConfig | None:
        """The configured folder ``path`` is in, or is (the deepest one), or None."""
        owners = [f for f in self.folders if path.is_relative_to(f.path)]
        return max(owners, key=lambda f: len(f.path.parts)) if owners else None

    def own_dirs(self, folder: FolderConfig) -> list[str]:
        """Our own output folders inside a watched folder (relative paths): never work, never watched or scanned."""
        out = []
        for d in (self.output_dir_for(folder), folder.done_dir, folder.failed_dir, self.sidecar.directory):
            if d is not None and d != folder.path and d.is_relative_to(folder.path):
                out.append(os.path.relpath(d, folder.path))
        return out

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = _TOML_FILE.get("path")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)


_TOML_FILE: dict[str, Path | None] = {"path": None}


def default_config_path() -> Path:
    """The platform's config file location (``~/.config/watcher/config.toml`` on Linux)."""
    return Path(platformdirs.user_config_dir(APP)) / "config.toml"


def find_config(explicit: Path | None, env: Mapping[str, str]) -> Path | None:
    """``--config``, else ``$WATCHER_CONFIG``, else the platform file if it exists, else None."""
    if explicit is not None:
        if not explicit.is_file():
            raise ConfigError(f"config file {explicit} does not exist (given with --config)")
        return explicit
    if env.get("WATCHER_CONFIG"):
        path = Path(env["WATCHER_CONFIG"])
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (given by WATCHER_CONFIG)")
        return path
    path = default_config_path()
    return path if path.is_file() else None


def _describe(error: Any) -> str:
    """One validation error as "key: what is wrong" (a rule over several keys names its keys itself)."""
    loc = ""
    for part in error["loc"]:
        loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
    if error["type"] == "extra_forbidden":
        return f"{loc}: unknown key"
    if error["type"] == "missing":
        return f"{loc}: required key is missing"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{loc}: {message}" if loc else message


def load_settings(
    config_path: Path | None,
    env: Mapping[str, str],
    *,
    folders: list[Path] | None = None,
    **overrides: Any,
) -> Settings:
    """Load, validate and resolve settings; ``folders`` from the command line replace the configured list.

    A folder given on the command line keeps the options of a configured folder with the same path.
    """
    source = f" in {config_path}" if config_path else ""
    data: dict[str, Any] = {}
    if config_path is not None:
        try:
            with config_path.open("rb") as fh:
                data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {config_path} is not valid TOML: {exc}") from exc
        except OSError as exc:
            raise ConfigError(f"config file {config_path} cannot be read: {exc.strerror}") from exc
    if folders:
        configured = {
            os.path.abspath(os.path.expanduser(str(f.get("path", "")))): f
            for f in data.get("folders", [])
            if isinstance(f, dict)
        }
        chosen = [os.path.abspath(raw.expanduser()) for raw in folders]
        overrides["folders"] = [configured.get(path, {"path": path}) for path in chosen]
    _TOML_FILE["path"] = config_path
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise ConfigError(f"invalid configuration{source}: {problems}") from None
    finally:
        _TOML_FILE["path"] = None
    return resolve_secrets(settings, env)


def service_identity(service: str, base_url: str, key: SecretStr | None) -> str:
    """Where paid work is done, as the store keys it: the service, its endpoint and a fingerprint of the account.

    The fingerprint is a keyed BLAKE2b of the API key, 48 bits: it tells accounts apart and cannot be reversed.
    """
    secret = reveal(key)
    account = (
        hashlib.blake2b(secret.encode(), digest_size=6, person=b"watcher-acct").hexdigest() if secret else "none"
    )
    return f"{service} {base_url.rstrip('/')} account:{account}"


def reveal(secret: SecretStr | None) -> str | None:
    """The plain value of an optional secret, for the one place that sends it."""
    return secret.get_secret_value() if secret is not None else None


def read_secret_file(path: Path, what: str) -> SecretStr:
    """The stripped content of a key file; errors name the file, never its content."""
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None
    if not value:
        raise ConfigError(f"{what}: {path} is empty")
    return SecretStr(value)


def resolve_key(
    key: SecretStr | None,
    key_file: Path | None,
    env: Mapping[str, str],
    *,
    section: str,
    env_name: str,
    credential: str,
) -> SecretStr | None:
    """The first of: the config value, the key file, ``env_name``, ``$CREDENTIALS_DIRECTORY/credential``."""
    if key is not None and key.get_secret_value():
        return key
    if key_file is not None:
        return read_secret_file(key_file.expanduser(), f"{section}.api_key_file")
    if env.get(env_name):
        return SecretStr(env[env_name].strip())
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    if cred_dir and (Path(cred_dir) / credential).is_file():
        return read_secret_file(Path(cred_dir) / credential, f"systemd credential {credential}")
    return None


def resolve_secrets(settings: Settings, env: Mapping[str, str]) -> Settings:
    """Fill in API keys from their other sources and the systemd state folder."""
    analysis = settings.analysis
    key = resolve_key(
        analysis.api_key,
        analysis.api_key_file,
        env,
        section="analysis",
        env_name="ESSENTIA_API_KEY",
        credential="essentia_api_key",
    )
    archive = settings.archive
    archive_key = resolve_key(
        archive.api_key,
        archive.api_key_file,
        env,
        section="archive",
        env_name="NEURALANALOG_API_KEY",
        credential="neuralanalog_api_key",
    )
    update: dict[str, Any] = {
        "analysis": analysis.model_copy(update={"api_key": key}),
        "archive": archive.model_copy(update={"api_key": archive_key}),
    }
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    if settings.store.url and settings.store.passfile is None and cred_dir and (Path(cred_dir) / "pgpass").is_file():
        update["store"] = settings.store.model_copy(update={"passfile": Path(cred_dir) / "pgpass"})
    if env.get("STATE_DIRECTORY") and "state_dir" not in settings.model_fields_set:
        update["state_dir"] = Path(env["STATE_DIRECTORY"].split(":")[0])
    return settings.model_copy(update=update)


def secrets_of(settings: Settings) -> list[str]:
    """Every secret value in the settings, for the log redactor."""
    found = []
    for section in (settings.analysis, settings.archive):
        if section.api_key is not None:
            found.append(section.api_key.get_secret_value())
    if settings.webhooks.secret is not None:
        found.append(settings.webhooks.secret.get_secret_value())
    if settings.web.token is not None:
        found.append(settings.web.token.get_secret_value())
    return [s for s in found if s]
