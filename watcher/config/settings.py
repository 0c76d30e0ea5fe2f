"""The whole of the settings and how they are loaded: file, environment, command line; errors name the key."""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import (
    Field,
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

from watcher.config.audio_url import expand, query_secrets
from watcher.config.bwlimit import parse_bwlimit
from watcher.config.secrets import resolve_key
from watcher.config.sections import (
    APP,
    SEND_BODY,
    AbsolutePath,
    AnalysisConfig,
    ArchiveConfig,
    ControlConfig,
    FolderConfig,
    MetricsConfig,
    RetryConfig,
    SidecarConfig,
    StoreConfig,
    WebConfig,
    WebhooksConfig,
)
from watcher.errors import ConfigError


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
    control: ControlConfig = ControlConfig()
    # rclone's --bwlimit syntax for every byte either service sends or receives: "4M", "512k:off", a timetable
    # "08:00,1M 19:00,off" (local time); "off" for none.
    bwlimit: str = "off"

    @field_validator("bwlimit")
    @classmethod
    def _bwlimit_parses(cls, value: str) -> str:
        """A bandwidth limit that cannot be read is refused at load, naming the key, not at the first upload."""
        return str(parse_bwlimit(value))

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
        containing = [f for f in self.folders if path.is_relative_to(f.path)]
        return max(containing, key=lambda f: len(f.path.parts)) if containing else None

    def audio_url_template_for(self, folder: FolderConfig) -> str:
        """The folder's audio URL template: its own when set, else [analysis]'s; "" when its bytes are sent."""
        template = self.analysis.audio_url_template if folder.audio_url_template is None else folder.audio_url_template
        return "" if template == SEND_BODY else template

    def audio_url_templates(self) -> list[str]:
        """Every audio URL template in use (global and per folder), for checks and the log redactor."""
        found = [self.analysis.audio_url_template, *(f.audio_url_template or "" for f in self.folders)]
        return [t for t in dict.fromkeys(found) if t and t != SEND_BODY]

    def audio_url_for(self, folder: str, rel_path: str) -> str | None:
        """The URL the analysis service fetches the file at ``rel_path`` in the watched ``folder`` from, or None
        when the file's bytes are sent (no template for that folder)."""
        options = self.folder_for(Path(folder))
        template = self.audio_url_template_for(options) if options is not None else self.analysis.audio_url_template
        return expand(template, folder, rel_path) if template else None

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


def _describe(error: Any, env: Mapping[str, str] | None = None) -> tuple[str, bool]:
    """One validation error as "key: what is wrong" (a rule over several keys names its keys itself), and whether
    an environment variable set it (then it is named). An unknown key gets the nearest known ones (difflib)."""
    loc = ""
    keys: list[str] = []
    for part in error["loc"]:
        loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        if not isinstance(part, int):
            keys.append(str(part))
    variable = _env_name(keys, env or {})
    where = f" (set by the environment variable {variable})" if variable else ""
    if error["type"] == "extra_forbidden":
        near = difflib.get_close_matches(keys[-1] if keys else "", _known_keys(keys[:-1]), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(near)}?" if near else ""
        return f"{loc}{where}: unknown key{hint}", bool(variable)
    if error["type"] == "missing":
        return f"{loc}: required key is missing", False
    message = str(error["msg"]).removeprefix("Value error, ")
    return (f"{loc}{where}: {message}" if loc else message), bool(variable)


def _env_name(keys: list[str], env: Mapping[str, str]) -> str | None:
    """The ``WATCHER_...`` variable that sets the key at ``keys``, when the environment has one (any case)."""
    if not keys:
        return None
    wanted = ("WATCHER_" + "__".join(keys)).upper()
    return next((name for name in env if name.upper() == wanted), None)


def _known_keys(keys: list[str]) -> list[str]:
    """The keys a section takes (``[]``: the top level; ``["analysis"]``: [analysis]; folders' entries too)."""
    model: Any = Settings
    for key in keys:
        field = getattr(model, "model_fields", {}).get(key)
        if field is None:
            return []
        inner = field.annotation
        for arg in getattr(inner, "__args__", ()):  # tuple[FolderConfig, ...], X | None
            if hasattr(arg, "model_fields"):
                inner = arg
        model = inner
    return list(getattr(model, "model_fields", {}))


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
        described = [_describe(e, env) for e in exc.errors()]
        problems = "; ".join(text for text, _ in described)
        if all(from_env for _, from_env in described):
            source = " from the environment"  # the file is not to blame
        raise ConfigError(f"invalid configuration{source}: {problems}") from None
    finally:
        _TOML_FILE["path"] = None
    return resolve_secrets(settings, env)


def resolve_secrets(settings: Settings, env: Mapping[str, str]) -> Settings:
    """Fill in API keys from their other sources and the systemd state folder."""
    analysis = settings.analysis
    key, analysis_src = resolve_key(
        analysis.api_key,
        analysis.api_key_file,
        env,
        section="analysis",
        env_name="ESSENTIA_API_KEY",
        credential="essentia_api_key",
    )
    archive = settings.archive
    archive_key, archive_src = resolve_key(
        archive.api_key,
        archive.api_key_file,
        env,
        section="archive",
        env_name="NEURALANALOG_API_KEY",
        credential="neuralanalog_api_key",
    )
    analysis_new = analysis.with_key(key, analysis_src)
    archive_new = archive.with_key(archive_key, archive_src)
    update: dict[str, Any] = {"analysis": analysis_new, "archive": archive_new}
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
    for template in settings.audio_url_templates():
        found += query_secrets(template)
    return [s for s in found if s]
