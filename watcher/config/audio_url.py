"""``audio_url_template``: where the analysis service can fetch a file itself (a CDN), instead of receiving its bytes.

A template is an http(s) URL with placeholders, checked once when the settings load:

- ``{relpath}``: the file's path inside its watched folder, each segment percent-encoded, ``/`` kept between them;
- ``{name}``: the file's name, percent-encoded;
- ``{folder}``: the watched folder's own name, percent-encoded.

Segments are encoded from the name's exact bytes (a name that is not valid UTF-8 included), so any name maps to
one URL. A template may carry a token in its query string: :func:`without_query` is the only form of an expanded
URL that may be logged or written to a sidecar.
"""

from __future__ import annotations

import os
import string
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

PLACEHOLDERS = ("relpath", "name", "folder")


def _encode(segment: str) -> str:
    """One path segment as a URL segment: every byte but the unreserved ones percent-encoded."""
    return quote(os.fsencode(segment), safe="")


def _fields(template: str) -> list[str]:
    """The placeholders a template uses; ValueError for a broken or unknown one."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        hint = "write a literal brace as {{ or }}"
        raise ValueError(f"{template!r} is not a valid template ({exc}; {hint})") from None
    found = []
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if field not in PLACEHOLDERS or spec or conversion:
            known = ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
            shown = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise ValueError(f"unknown placeholder {shown} in {template!r} (known: {known})")
        found.append(field)
    return found


def check_template(template: str) -> str:
    """``template`` itself when it is a usable URL template, else ValueError saying what is wrong."""
    fields = _fields(template)
    if "relpath" not in fields and "name" not in fields:
        raise ValueError(f"{template!r} needs {{relpath}} (or {{name}}): without it every file maps to one URL")
    one = urlsplit(template.format(relpath="a", name="a", folder="a"))
    other = urlsplit(template.format(relpath="b", name="b", folder="b"))
    if one.scheme not in ("http", "https") or not one.hostname:
        raise ValueError(f"{template!r} is not an http:// or https:// URL with a host")
    if one.netloc != other.netloc:
        raise ValueError(f"{template!r} has a placeholder in its host: placeholders go in the path or the query")
    if one.username is not None or one.password is not None:
        raise ValueError(f"{template!r} carries user:password@; put a token in the query string instead")
    if one.fragment or "#" in template:
        raise ValueError(f"{template!r} has a #fragment, which is never sent to the server")
    return template


def expand(template: str, folder: str, rel_path: str) -> str:
    """The URL of the file at ``rel_path`` inside the watched ``folder`` (a template :func:`check_template` passed)."""
    segments = [s for s in rel_path.split(os.sep) if s not in ("", ".")]
    return template.format(
        relpath="/".join(_encode(s) for s in segments),
        name=_encode(segments[-1] if segments else ""),
        folder=_encode(os.path.basename(os.path.normpath(folder))),
    )


def without_query(url: str) -> str:
    """The URL as it may be shown and kept: scheme, host, port and path; never the query (it may hold a token)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def query_secrets(template: str) -> list[str]:
    """The literal values of a template's query string (tokens, maybe), for the log redactor."""
    query = urlsplit(template).query
    if not query:
        return []
    values = [v for _, v in parse_qsl(query, keep_blank_values=False) if "{" not in v and "}" not in v]
    return [*values, *(quote(v, safe="") for v in values)]
