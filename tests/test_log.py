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


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_odd_names_never_break_a_log_line(tmp_path, fmt):
    """A name that is not UTF-8, or holds a newline, is logged in display form to a strict UTF-8 stream."""
    import os

    odd = os.fsdecode(b"/in/caf\xe9\nnext.wav")
    with (tmp_path / "log").open("w", encoding="utf-8", errors="strict") as out:
        configure_logging(fmt, "info", stream=out)
        log = structlog.get_logger("test")
        log.info("file.settled", path=odd, nested={"paths": [odd]}, raw=os.fsencode(odd))
        try:
            raise OSError(f"cannot open {odd}")
        except OSError:
            log.exception("step.failed", path=odd)
    text = (tmp_path / "log").read_bytes().decode("utf-8")  # strict: the file is valid UTF-8
    assert text.count("/in/caf\\xe9\\x0anext.wav") >= 3 or text.count("/in/caf\\\\xe9\\\\x0anext.wav") >= 3
    if fmt == "json":
        lines = [json.loads(line) for line in text.splitlines()]
        assert lines[0]["path"] == lines[0]["nested"]["paths"][0] == lines[0]["raw"] == "/in/caf\\xe9\\x0anext.wav"
        assert lines[1]["path"] == "/in/caf\\xe9\\x0anext.wav" and "cannot open /in/caf\\xe9" in lines[1]["exception"]
    else:
        first = text.splitlines()[0]
        assert "file.settled" in first and "path=/in/caf\\xe9\\x0anext.wav" in first


def test_processors_rewrite_only_the_fields_that_need_it():
    """A secret inside a longer secret is redacted whole; plain text, numbers and None pass as they are, and a
    field with a secret or an odd name is rewritten in the event itself."""
    from watcher.log import printable_names, redact_secrets

    register_secrets(["tok-1234", "tok-1234-extended"])
    plain = "/in/a.wav"
    event = {"event": "x", "path": plain, "n": 3, "f": 0.5, "none": None, "key": "use tok-1234-extended now"}
    out = redact_secrets(None, "info", event)
    assert out is event and out["key"] == "use [redacted] now"
    assert out["path"] is plain and out["n"] == 3 and out["f"] == 0.5 and out["none"] is None
    odd = "/in/a\nb.wav"
    out = printable_names(None, "info", {"path": odd, "ok": plain, "exception": "Traceback\n  line"})
    assert out["path"] == "/in/a\\x0ab.wav" and out["ok"] is plain and out["exception"] == "Traceback\n  line"
