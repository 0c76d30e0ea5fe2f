"""Settings: a TOML file, overridden by ``WATCHER_...`` environment variables, resolved once into frozen objects.

The file is found by ``--config PATH``, else ``$WATCHER_CONFIG``, else the platform's config folder; no file at
all is fine. Unknown keys and bad values raise :class:`ConfigError` naming the key. API keys are resolved here
(config, key file, ``ESSENTIA_API_KEY``/``NEURALANALOG_API_KEY``, systemd credentials) and travel as SecretStr.
"""

from watcher.config.secrets import (
    account_fingerprint,
    canonical_endpoint,
    read_secret_file,
    resolve_key,
    reveal,
    service_identity,
)
from watcher.config.sections import (
    APP,
    AUDIO_PATTERNS,
    DEFAULT_MODELS,
    AnalysisConfig,
    ArchiveConfig,
    ArchiveVersion,
    AudioFormat,
    FolderConfig,
    MetricsConfig,
    RetryConfig,
    SidecarConfig,
    StoreConfig,
    WebConfig,
    WebhooksConfig,
)
from watcher.config.settings import (
    Settings,
    default_config_path,
    find_config,
    load_settings,
    resolve_secrets,
    secrets_of,
)

__all__ = [
    "APP",
    "AUDIO_PATTERNS",
    "DEFAULT_MODELS",
    "AnalysisConfig",
    "ArchiveConfig",
    "ArchiveVersion",
    "AudioFormat",
    "FolderConfig",
    "MetricsConfig",
    "RetryConfig",
    "Settings",
    "SidecarConfig",
    "StoreConfig",
    "WebConfig",
    "WebhooksConfig",
    "account_fingerprint",
    "canonical_endpoint",
    "default_config_path",
    "find_config",
    "load_settings",
    "read_secret_file",
    "resolve_key",
    "resolve_secrets",
    "reveal",
    "secrets_of",
    "service_identity",
]
