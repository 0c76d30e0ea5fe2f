"""Logging: structlog, readable on a terminal and JSON lines otherwise, with secrets redacted everywhere."""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any, Literal, TextIO

import structlog

from watcher.names import display

LogFormat = Literal["auto", "console", "json"]
REDACTED = "[redacted]"
_secrets: set[str] = set()
_secret_pattern: re.Pattern[str] | None = None  # every registered secret, longest first
_PLAIN = frozenset({int, float, bool, type(None)})  # values no processor here ever changes


def register_secrets(values: Iterable[str]) -> None:
    """Values that must never appear in a log line (API keys); short values are ignored as unsafe to match."""
    global _secret_pattern
    _secrets.update(v for v in values if v and len(v) >= 4)
    if _secrets:
        _secret_pattern = re.compile("|".join(re.escape(s) for s in sorted(_secrets, key=len, reverse=True)))


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return value if _secret_pattern is None else _secret_pattern.sub(REDACTED, value)
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_scrub(v) for v in value)
    if isinstance(value, BaseException):
        return _scrub(f"{type(value).__name__}: {value}")
    return value


def redact_secrets(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: replace every registered secret in every field, tracebacks included.

    Only a field that holds a secret, or a container or an exception, is rewritten (in place)."""
    pattern = _secret_pattern
    if pattern is None:
        return event_dict
    for key, value in event_dict.items():
        kind = type(value)
        if kind is str:
            if pattern.search(value) is not None:
                event_dict[key] = pattern.sub(REDACTED, value)
        elif kind not in _PLAIN:
            event_dict[key] = _scrub(value)
    return event_dict


# Surrogate escapes (bytes of a name that is not UTF-8) or control characters other than tab and newline.
_ODD = re.compile(r"[\ud800-\udfff\x00-\x08\x0b-\x1f\x7f]")
_ODD_WITH_NEWLINE = re.compile(r"[\ud800-\udfff\x00-\x08\x0a-\x1f\x7f]")
_MULTILINE = ("exception", "stack")  # tracebacks keep their line breaks


def _printable(value: str, *, multiline: bool = False) -> str:
    """``value`` as :func:`watcher.names.display` shows a name; never raises (any lone surrogate is escaped)."""
    if not (_ODD if multiline else _ODD_WITH_NEWLINE).search(value):
        return value
    if multiline:
        return "\n".join(_printable(line) for line in value.split("\n"))
    try:
        return display(value)
    except UnicodeError:  # a surrogate that is not an escaped byte: show its code point instead
        return (
            value.encode("utf-8", "backslashreplace")
            .decode("ascii", "replace")
            .translate({c: f"\\x{c:02x}" for c in range(32)})
        )


def _shown(value: Any, *, multiline: bool = False) -> Any:
    """A log field's value with every name in it made printable (see :func:`_printable`)."""
    if isinstance(value, str):
        return _printable(value, multiline=multiline)
    if isinstance(value, os.PathLike):
        return _printable(os.fspath(value)) if isinstance(os.fspath(value), str) else value
    if isinstance(value, bytes):
        return _printable(os.fsdecode(value))
    if isinstance(value, dict):
        return {k: _shown(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_shown(v) for v in value)
    return value


def printable_names(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: a field holding a name that is not valid UTF-8 or has control characters (a
    newline) is shown as :func:`watcher.names.display` gives it, so no renderer or stream ever fails on it.

    Only such a field, or a container, a path or bytes, is rewritten (in place): plain text and numbers pass."""
    for key, value in event_dict.items():
        if type(value) not in _PLAIN:
            shown = _shown(value, multiline=key in _MULTILINE)
            if shown is not value:  # printable text comes back as it is
                event_dict[key] = shown
    return event_dict


def configure_logging(fmt: LogFormat = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Set up structlog (and route stdlib logging through the same renderer)."""
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any
    # Tracebacks become text before the last two steps, so their names are shown safely and secrets scrubbed.
    tail: list[Any] = [structlog.processors.format_exc_info, printable_names, redact_secrets]
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    numeric = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[*shared, *tail, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    # Libraries log through stdlib logging; keep their noise down and their secrets out.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(processor=renderer, foreign_pre_chain=[*shared, *tail]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.WARNING))
    # The pool's reconnect attempts, one line each, repeat what store.unreachable says once, with what happens next.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
