"""What the emulated services could bill, and a seeded random fault source (chaos mode).

Both emulated services share one :class:`Ledger` and one :class:`Chaos`: the ledger keeps the bill, one
:class:`Charge` per request a service accepted and could bill (its account, content, operations and audio seconds),
whatever became of its answer; a request refused before any work (401, 429, 5xx, 4xx) is not on it. Tests hold
it against watcher's own ledger. Chaos makes each request meet a random fault with a fixed probability, from a
seeded RNG, and records the faults it injected.
"""

from __future__ import annotations

import hashlib
import random
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

# Faults chaos draws from: any request may meet an HTTP refusal before any work is done ...
REFUSALS: tuple[str, ...] = ("429", "500", "503")
# ... an analysis stream may be dropped after its first result (the work is done, so it is paid) ...
STREAM_FAULTS: tuple[str, ...] = (*REFUSALS, "drop_stream")
# ... and a paid POST may do its work and then lose its answer (paid too).
PAID_POST_FAULTS: tuple[str, ...] = (*REFUSALS, "lose_answer")
# The storage host answers like an object store: no 429, but 500 and 503 happen.
STORAGE_FAULTS: tuple[str, ...] = ("500", "503")


def account_of(key: str | None) -> str:
    """The account a request's key names on the bill: a fingerprint (the bill never holds a key), the same one
    watcher's ledger names its endpoint's account by (``config.secrets.service_identity``)."""
    if not key:
        return "account:none"
    return "account:" + hashlib.blake2b(key.encode(), digest_size=6, person=b"watcher-acct").hexdigest()


@dataclass(frozen=True)
class Charge:
    """One request a service accepted and could bill: its account, the audio content, the operations it did
    (``analyze:<model>`` per model, or ``upload``, ``restore``, ``master``, ``stems``) and the audio's seconds
    (None when the emulator cannot tell)."""

    service: str  # analysis, processing
    host: str  # the host:port the request was sent to (its Host header)
    account: str
    sha256: str
    operations: tuple[str, ...]
    seconds: float | None


class Ledger:
    """The bill: the requests the services accepted and could bill, in order. Thread-safe.

    ``snapshot()`` counts them per ``(content sha256 hex, operation)``: ``analyze:<model>`` (model as requested,
    version stripped), ``upload``, ``restore``, ``master``, ``stems``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._charges: list[Charge] = []

    def charge(
        self, service: str, host: str, account: str, sha256: str, operations: Sequence[str], seconds: float | None
    ) -> None:
        """One accepted request goes on the bill."""
        with self._lock:
            self._charges.append(Charge(service, host, account, sha256, tuple(operations), seconds))

    def charges(self, account: str | None = None) -> list[Charge]:
        """The bill, in order (of one ``account`` when given)."""
        with self._lock:
            return [c for c in self._charges if account is None or c.account == account]

    def snapshot(self) -> Counter[tuple[str, str]]:
        with self._lock:
            return Counter((c.sha256, op) for c in self._charges for op in c.operations)

    def clear(self) -> None:
        with self._lock:
            self._charges.clear()


class Chaos:
    """Each request meets a random fault with probability ``rate`` (seeded); ``injected`` lists them.

    With ``rate`` 0 (the default) nothing is ever drawn, so the RNG is not advanced either.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rng = random.Random(0)
        self.seed: int | None = None
        self.rate = 0.0
        self.retry_after = 0.1  # seconds sent in Retry-After with an injected 429
        self._injected: list[tuple[str, str]] = []

    def configure(self, seed: int, rate: float) -> None:
        """Start (or, with ``rate`` 0, stop) drawing faults from a fresh RNG seeded with ``seed``."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"chaos rate must be between 0 and 1, got {rate}")
        with self._lock:
            self._rng = random.Random(seed)
            self.seed = seed
            self.rate = rate

    def draw(self, route: str, choices: Sequence[str]) -> str | None:
        """The fault this request meets (one of ``choices``), or None; an injected fault is recorded."""
        with self._lock:
            if self.rate <= 0.0 or self._rng.random() >= self.rate:
                return None
            fault = self._rng.choice(list(choices))
            self._injected.append((route, fault))
            return fault

    @property
    def injected(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._injected)

    def clear(self) -> None:
        """Stop injecting and forget what was injected."""
        with self._lock:
            self.rate = 0.0
            self.seed = None
            self._injected.clear()


class RateLimit:
    """A service-side rate limit per API key: a token bucket of ``burst`` requests refilled at ``per_second``.

    A request over it is refused with 429 and a Retry-After saying when the next one will be let in; refusals
    are counted per route. ``burst`` defaults to one second's worth (``per_second``), as token-bucket
    limiters are usually set; ``burst=1`` makes it strict (no two requests closer than 1/per_second).
    """

    def __init__(self, per_second: float, *, key_header: str, burst: float | None = None) -> None:
        self.per_second = per_second
        self.burst = max(1.0, burst if burst is not None else per_second)
        self.key_header = key_header
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self.refused: Counter[str] = Counter()
        self.admitted: Counter[str] = Counter()

    def admit(self, key: str, route: str, now: float) -> float | None:
        """None when this request may go in; else the seconds until one may (the Retry-After)."""
        with self._lock:
            tokens, at = self._tokens.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.per_second)
            if tokens >= 1.0:
                self._tokens[key] = (tokens - 1.0, now)
                self.admitted[route] += 1
                return None
            self._tokens[key] = (tokens, now)
            self.refused[route] += 1
            return (1.0 - tokens) / self.per_second

    def clear(self) -> None:
        with self._lock:
            self._tokens.clear()
            self.refused.clear()
            self.admitted.clear()
