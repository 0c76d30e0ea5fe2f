"""Logging: JSON lines when asked, and a registered secret never printed, wherever it hides."""

from __future__ import annotations

import io
import json

import pytest
import structlog

from watcher.log import configure_logging, register_secrets


@pytest.fixture(autouse=True)
def _restore_logging():
    yield
    structlog.reset_defaults()


def test_secrets_are_redacted_in_json_and_tracebacks():
    """A key in a field, a nested value, an exception message or a traceback is replaced."""
    secret = "sk-live-0123456789"
    register_secrets([secret])
    out = io.StringIO()
    configure_logging("json", "info", stream=out)
    log = structlog.get_logger("test")
    log.info("plain", path="/a.wav", header=f"Bearer {secret}", nested={"k": [secret]})
    try:
        raise ValueError(f"bad key {secret}")
    except ValueError:
        log.exception("failed", path="/a.wav")
    text = out.getvalue()
    assert secret not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines[0]["header"] == "Bearer [redacted]" and lines[0]["nested"] == {"k": ["[redacted]"]}
    assert "[redacted]" in lines[1]["exception"]


def test_console_format_is_readable():
    """The console renderer prints the event name and fields on one line."""
    out = io.StringIO()
    configure_logging("console", "info", stream=out)
    structlog.get_logger("test").info("file.settled", path="/in/a.wav")
    assert "file.settled" in out.getvalue() and "/in/a.wav" in out.getvalue()
