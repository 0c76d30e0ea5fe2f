"""Settings: TOML, environment overrides, clear errors, secrets from their four sources."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel

from watcher.config import AUDIO_PATTERNS, Settings, canonical_endpoint, find_config, load_settings, service_identity
from watcher.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_no_file_gives_defaults(tmp_path):
    """Without a file, the defaults apply and the CLI folders become the watched folders."""
    s = load_settings(None, {}, folders=[tmp_path])
    assert s.folders[0].path == tmp_path
    assert s.folders[0].include == AUDIO_PATTERNS
    assert s.analysis.models == ("key", "bpm_degara", "loudness-ebur128")
    assert s.sidecar.suffix == ".analysis.json" and s.sidecar.directory is None
    assert s.analysis.api_key is None


def test_toml_and_env_override(tmp_path, monkeypatch):
    """Environment variables override the file, nested with a double underscore."""
    cfg = write(
        tmp_path,
        f'state_dir = "{tmp_path}/st"\n[analysis]\nconcurrency = 3\nmodels = ["key:1"]\n'
        f'[[folders]]\npath = "{tmp_path}"\npoll = true\nsettle_seconds = 2\n',
    )
    monkeypatch.setenv("WATCHER_ANALYSIS__CONCURRENCY", "5")
    s = load_settings(cfg, {})
    assert s.analysis.concurrency == 5
    assert s.analysis.models == ("key:1",)
    assert s.folders[0].poll is True and s.folders[0].settle_seconds == 2
    assert s.state_dir == tmp_path / "st"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[analysis]\nmodles = ['key']\n", "analysis.modles: unknown key"),
        ("[analysis]\nconcurrency = 'many'\n", "analysis.concurrency:"),
        ("[[folders]]\nrecursive = true\n", "folders[0].path: required key is missing"),
        ("[[folders]]\npath = '/x'\nsettle_seconds = -1\n", "folders[0].settle_seconds:"),
        ("[analysis]\nmodels = ['key:']\n", "analysis.models:"),
        ("[analysis]\nbase_url = 'http://[::1'\n", "analysis.base_url: 'http://[::1' is not a usable URL"),
        ("[archive]\nbase_url = 'api.neuralanalog.com'\n", "archive.base_url: 'api.neuralanalog.com' is not an http"),
        ("bogus = 1\n", "bogus: unknown key"),
        ("[analysis\n", "is not valid TOML"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, expected):
    """Each mistake gives one message that names the key and the file."""
    cfg = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, {})
    assert expected in str(err.value)
    assert str(cfg) in str(err.value)


def test_cli_exits_2_on_bad_config(tmp_path):
    """`watcher status` with an unknown key exits 2 and prints the key, not a traceback."""
    cfg = write(tmp_path, "[sidecar]\nsufix = '.json'\n")
    proc = subprocess.run(
        [sys.executable, "-m", "watcher", "--config", str(cfg), "status"], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert "sidecar.sufix: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_config_lookup_order(tmp_path):
    """--config wins, then $WATCHER_CONFIG; a missing named file is an error."""
    a = write(tmp_path, "")
    assert find_config(a, {"WATCHER_CONFIG": "/nope"}) == a
    assert find_config(None, {"WATCHER_CONFIG": str(a)}) == a
    with pytest.raises(ConfigError, match="does not exist"):
        find_config(None, {"WATCHER_CONFIG": str(tmp_path / "missing.toml")})


def test_api_key_sources(tmp_path):
    """The key comes from the config, else the key file, else ESSENTIA_API_KEY, else systemd credentials."""
    keyfile = tmp_path / "key"
    keyfile.write_text("from-file-1234\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "essentia_api_key").write_text("from-credential-1234")
    env = {"ESSENTIA_API_KEY": "from-env-1234", "CREDENTIALS_DIRECTORY": str(creds)}
    direct = write(tmp_path, "[analysis]\napi_key = 'from-config-1234'\n")
    assert load_settings(direct, env).analysis.api_key.get_secret_value() == "from-config-1234"
    via_file = write(tmp_path, f"[analysis]\napi_key_file = '{keyfile}'\n")
    assert load_settings(via_file, env).analysis.api_key.get_secret_value() == "from-file-1234"
    assert load_settings(None, env).analysis.api_key.get_secret_value() == "from-env-1234"
    assert load_settings(None, {"CREDENTIALS_DIRECTORY": str(creds)}).analysis.api_key.get_secret_value() == (
        "from-credential-1234"
    )
    missing = write(tmp_path, f"[analysis]\napi_key_file = '{tmp_path}/nokey'\n")
    with pytest.raises(ConfigError, match=r"analysis\.api_key_file: cannot read"):
        load_settings(missing, {})


def test_secret_is_not_in_repr(tmp_path):
    """Settings print without the key."""
    s = load_settings(None, {"ESSENTIA_API_KEY": "very-secret-value"})
    assert "very-secret-value" not in repr(s)
    assert "very-secret-value" not in s.model_dump_json()


def _keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    out = set()
    for name, field in model.model_fields.items():
        ann = field.annotation
        inner = getattr(ann, "__args__", (None,))[0] if prefix == "" and name == "folders" else ann
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            out |= _keys(inner, f"{prefix}{name}.")
        else:
            out.add(prefix + name)
    return out


PASS_THROUGH = {"archive.restore", "archive.master", "archive.stems"}


def _toml_keys(data: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in data.items():
        if f"{prefix}{key}" in PASS_THROUGH:
            out.add(f"{prefix}{key}")  # a table sent to the service as given
        elif isinstance(value, dict):
            out |= _toml_keys(value, f"{prefix}{key}.")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            out |= _toml_keys(value[0], f"{prefix}{key}.")
        else:
            out.add(prefix + key)
    return out


def test_example_config_documents_every_key():
    """config.example.toml loads, and names every setting (state_dir as a comment, since it is platform-specific)."""
    path = ROOT / "config.example.toml"
    text = path.read_text()
    documented = _toml_keys(tomllib.loads(text)) | {"state_dir"}
    assert "# state_dir =" in text
    assert documented == _keys(Settings)
    load_settings(path, {})


@pytest.mark.parametrize(
    ("spelled", "canonical"),
    [
        ("https://api.essentia.upf.edu", "https://api.essentia.upf.edu"),
        ("HTTPS://API.Essentia.UPF.edu:443/", "https://api.essentia.upf.edu"),
        ("https://api.example.com:8443/v2//", "https://api.example.com:8443/v2"),
        ("http://localhost:8080", "http://127.0.0.1:8080"),
        ("http://127.0.0.2:8080/", "http://127.0.0.1:8080"),
        ("http://[::1]:8080", "http://127.0.0.1:8080"),
        ("http://[2001:db8::1]:80/", "http://[2001:db8::1]"),
        ("http://api.example.com:443", "http://api.example.com:443"),  # 443 is not http's default
    ],
)
def test_one_endpoint_has_one_spelling(spelled: str, canonical: str) -> None:
    """The store keys paid work by the endpoint: every spelling of one URL gives one key; other hosts stay apart."""
    assert canonical_endpoint(spelled) == canonical
    assert service_identity("analysis", spelled, None) == f"analysis {canonical} account:none"
