"""API keys and other secrets: where each is found and how an account is fingerprinted. Values travel as
SecretStr and are revealed only where they are sent."""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import SecretStr

from watcher.errors import ConfigError


def service_identity(service: str, base_url: str, key: SecretStr | None) -> str:
    """Where paid work is done, as the store keys it: the service, its endpoint and a fingerprint of the account.

    The fingerprint is a keyed BLAKE2b of the API key, 48 bits: it tells accounts apart and cannot be reversed.
    """
    return f"{service} {canonical_endpoint(base_url)} account:{account_fingerprint(key)}"


DEFAULT_PORTS = {"http": 80, "https": 443}
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


def canonical_endpoint(base_url: str) -> str:
    """One spelling for one endpoint, so paid work is found again however the URL is written: scheme and host in
    lower case, the default port and trailing slashes dropped, and every name of this machine's loopback
    (``localhost``, ``127.x.x.x``, ``[::1]``) written ``127.0.0.1``. Other aliases (two DNS names for one server)
    cannot be known and stay distinct. A URL that cannot be read is returned as it is, stripped."""
    try:
        parts = urlsplit(base_url.strip())
        port = parts.port
    except ValueError:
        return base_url.strip().rstrip("/")
    host = (parts.hostname or "").lower()
    if host in LOOPBACK_NAMES or _is_loopback_ip(host):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    scheme = parts.scheme.lower()
    netloc = host if port is None or port == DEFAULT_PORTS.get(scheme) else f"{host}:{port}"
    return f"{scheme}://{netloc}{parts.path.rstrip('/')}"


def _is_loopback_ip(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def account_fingerprint(key: SecretStr | None) -> str:
    """The account part of :func:`service_identity` ("none" without a key): what a sidecar records of the account."""
    secret = reveal(key)
    return hashlib.blake2b(secret.encode(), digest_size=6, person=b"watcher-acct").hexdigest() if secret else "none"


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
) -> tuple[SecretStr | None, str]:
    """The first of: the config value, the key file, ``env_name``, ``$CREDENTIALS_DIRECTORY/credential``; and
    where it came from, for messages (never the key itself)."""
    if key is not None and key.get_secret_value():
        return key, f"{section}.api_key in the config (or WATCHER_{section.upper()}__API_KEY)"
    if key_file is not None:
        where = f"{section}.api_key_file"
        return read_secret_file(key_file.expanduser(), where), f"{where} ({key_file})"
    if env.get(env_name):
        return SecretStr(env[env_name].strip()), f"the environment variable {env_name}"
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    if cred_dir and (Path(cred_dir) / credential).is_file():
        return read_credential(Path(cred_dir) / credential, credential), f"the systemd credential {credential}"
    return None, "no key configured"


def read_credential(path: Path, name: str) -> SecretStr | None:
    """A systemd credential (or a container secret), None when blank: the units default each key to a blank
    credential (``SetCredential=ID:\\n``), so that a key file that is not there means "no key", not a failed start."""
    try:
        blank = not path.read_text(encoding="utf-8").strip()
    except OSError:
        blank = False  # read_secret_file says what is wrong
    return None if blank else read_secret_file(path, f"systemd credential {name}")
