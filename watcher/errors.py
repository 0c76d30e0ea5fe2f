"""Every error watcher raises on purpose. Its class is its *scope*: what it stops, and what happens next; a job's
failures are told apart by their class in one place, the runner (watcher.runner); the CLI exits 2 on ConfigError.

    WatcherError
    ├── ConfigError      the configuration is wrong: fix it, then start again (exit code 2)
    ├── StartupError     the state folder or the store cannot be used (in use, no access): exit code 3
    ├── RetryLater       transient: the network, a 429/5xx, a full disk; backed off, then retried
    │   ├── NotSent      the request provably never reached the service: safe to resend even when it is paid
    │   ├── ExpiredURL   a signed download URL was refused: ask for a fresh one
    │   └── Deferred     not an error: wait (another copy is being paid for, a daily cap); no attempt is counted
    ├── NeedsUser        this service: the key was refused, no credits (401/402/403): that service pauses
    ├── InDoubt          this file, held: a paid request was sent whole and its answer lost; held for the user
    └── BadInput         this file: it cannot be processed as it is; other files are unaffected
        ├── Rejected     the service refused this file (4xx) or answered nonsense: a few attempts, then failed
        │   └── Malformed    an answer without the expected field, or a body that is not what was asked for
        └── FileChanged  the file changed or vanished while it was being read; its new revision is handled anew

Foreign exceptions (httpx, httpx-sse, OSError) are translated at the edge with ``raise ... from``.
"""

from __future__ import annotations


class WatcherError(Exception):
    """Base of every error watcher raises on purpose."""

    code = "error"  # the error's code, as `watcher status` and the store show it


class ConfigError(WatcherError):
    """The configuration is invalid; the message names the key and what is wrong with it."""

    code = "config"


class StartupError(WatcherError):
    """The state folder or the store cannot be used: held by another daemon, or not ours to open (exit code 3)."""

    code = "startup"


class RetryLater(WatcherError):
    """A transient failure: try again later, after ``retry_after`` seconds when the cause said so."""

    code = "retry_later"

    def __init__(self, message: str, *, retry_after: float | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status


class NotSent(RetryLater):
    """The request never reached the service (no connection, a 429, a body cut short): resending cannot pay twice."""


class ExpiredURL(RetryLater):
    """A temporary download URL was refused (expired or revoked): ask for a fresh one."""


class Deferred(RetryLater):
    """Nothing went wrong, but the job must wait until ``until`` (a Unix time); no attempt is counted.

    ``reason`` is what `watcher status` shows ("waiting for ...", "daily cap ... reached").
    """

    code = "waiting"

    def __init__(self, message: str, *, until: float, code: str = "waiting", routine: bool = False) -> None:
        super().__init__(message)
        self.until = until
        self.code = code
        # routine: ordinary pacing (a status poll waiting for its turn), not worth a line in the log or status
        self.routine = routine


class NeedsUser(WatcherError):
    """The service refuses the account (key, credits, plan): the service pauses until a person acts."""

    code = "needs_user"

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class InDoubt(WatcherError):
    """A paid request was sent in full and its answer was lost: it may have been done (and billed).

    The job is held (``[archive] in_doubt = "hold"``) until `watcher retry` says to send it again.
    """

    code = "in_doubt"

    def __init__(self, message: str, *, operation: str, since: float, keys: list[list[str]]) -> None:
        super().__init__(message)
        self.operation = operation
        self.since = since
        self.keys = keys


class BadInput(WatcherError):
    """This file cannot be processed as it stands (empty, not audio); final at once, other files are unaffected."""

    code = "bad_input"
    final = True  # False: a few more attempts may help (the service's answer, not the file itself)


class Rejected(BadInput):
    """The service refused this file's request (400, 404, 409, 413, 415, 422, ...): retried a few times, then failed."""

    code = "rejected"
    final = False

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Malformed(Rejected):
    """The service answered something that is not what was asked for (no ID, not an event stream, not JSON)."""

    code = "malformed"


class FileChanged(BadInput):
    """The file changed or disappeared while it was being processed; its newer revision is handled anew."""

    code = "file_changed"
