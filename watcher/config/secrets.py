"""API keys and other secrets: where they are found, how they are fingerprinted, and the list the log redactor
hides. Values travel as SecretStr and are revealed only where they are sent."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from watcher.errors import ConfigError

if TYPE_CHECKING:
    from watcher.config.settings import Settings


def service_identity(service: str, base_url: str, key: SecretStr | None) -> str:
    """Where paid work is done, as the store keys it: the service, its endpoint and a fingerprint of the account.

    The fingerprint is a keyed BLAKE2b of the API key, 48 bits: it tells accounts apart and cannot be reversed.
    """
    secret = reveal(key)
    account = hashlib.blake2b(secret.encode(), digest_size=6, person=b"watcher-acct").hexdigest() if secret else "none"
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
