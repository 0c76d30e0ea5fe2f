"""Every error watcher raises on purpose, classified by what should happen next.

    WatcherError
    ├── ConfigError      the configuration is wrong: fix it, then start again (exit code 2)
    ├── RetryLater       transient: the network, a 429/5xx, a full disk; the store schedules another attempt
    │   ├── NotSent      the request never left (no connection): safe to resend even when it is paid
    │   └── ExpiredURL   a signed download URL was refused: ask for a fresh one
    ├── NeedsUser        a person must act: bad API key, no credits, a refused request (401/402/403, other 4xx)
    └── BadInput         this file cannot be processed as it is (empty, not audio, rejected by a service)
        └── FileChanged  the file changed or vanished while it was being read; its new version gets its own turn

Foreign exceptions (httpx, httpx-sse, OSError) are translated at the edge with ``raise ... from``.
"""

from __future__ import annotations


class WatcherError(Exception):
    """Base of every error watcher raises on purpose."""

    kind = "error"


class ConfigError(WatcherError):
    """The configuration is invalid; the message names the key and what is wrong with it."""

    kind = "config"


class RetryLater(WatcherError):
    """A transient failure: try again later, after ``retry_after`` seconds when the cause said so."""

    kind = "retry_later"

    def __init__(self, message: str, *, retry_after: float | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status


class NotSent(RetryLater):
    """The request never reached the service (no connection): resending it cannot pay twice."""

    kind = "retry_later"


class ExpiredURL(RetryLater):
    """A temporary download URL was refused (expired or revoked): ask for a fresh one."""


class NeedsUser(WatcherError):
    """A failure only a person can fix (credentials, credits, a request the service refuses)."""

    kind = "needs_user"

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def account_problem(self) -> bool:
        """The key was refused, the plan forbids it, or the credits ran out (not a problem with one request)."""
        return self.status in (401, 402, 403)


class BadInput(WatcherError):
    """This file cannot be processed as it stands; other files are unaffected."""

    kind = "bad_input"


class FileChanged(BadInput):
    """The file changed or disappeared while it was being processed; its newer version is handled anew."""

    kind = "file_changed"
