"""systemd's notify protocol: READY, STATUS, WATCHDOG, RELOADING, STOPPING and EXTEND_TIMEOUT_USEC.

``notifier_from_environ`` gives a real notifier when ``$NOTIFY_SOCKET`` is set (under ``Type=notify``),
else a null object, so the daemon never checks. Send failures are logged once and never raised.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from typing import Protocol

import structlog

log = structlog.get_logger("watcher.sdnotify")


class Notifier(Protocol):
    """What the daemon tells its supervisor. After ``reloading()``, ``ready()`` says the reload is over."""

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of WatchdogSec), or None when no watchdog is set."""
        ...

    def ready(self) -> None: ...

    def status(self, text: str) -> None: ...

    def watchdog(self) -> None: ...

    def extend_timeout(self, seconds: float) -> None: ...

    def reloading(self) -> None: ...

    def stopping(self) -> None: ...

    def close(self) -> None: ...


class NullNotifier:
    """Not under systemd: every message goes nowhere."""

    watchdog_interval: float | None = None

    def ready(self) -> None:
        return

    def status(self, text: str) -> None:
        return

    def watchdog(self) -> None:
        return

    def extend_timeout(self, seconds: float) -> None:
        return

    def reloading(self) -> None:
        return

    def stopping(self) -> None:
        return

    def close(self) -> None:
        return


class SystemdNotifier:
    """Datagrams to ``$NOTIFY_SOCKET``: a path, or an abstract socket written ``@name``.

    The socket does not block: a message systemd cannot take at once is dropped (and logged once),
    so a ping never stalls the event loop.
    """

    def __init__(self, address: str, watchdog_usec: int | None = None) -> None:
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_interval: float | None = watchdog_usec / 2e6 if watchdog_usec and watchdog_usec > 0 else None
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)
        self._warned = False

    def send(self, message: str) -> bool:
        """Send one datagram of newline-separated ``KEY=VALUE`` lines; False (logged once) if it failed."""
        try:
            self._sock.sendto(message.encode(), self.address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning(
                    "sdnotify.send_failed",
                    socket=self.address.replace("\0", "@"),
                    error=exc.strerror or type(exc).__name__,
                    next="carrying on; systemd may not see readiness or watchdog pings",
                )
            return False
        return True

    def close(self) -> None:
        self._sock.close()

    def ready(self) -> None:
        self.send("READY=1")

    def status(self, text: str) -> None:
        self.send("STATUS=" + " ".join(text.splitlines()))

    def watchdog(self) -> None:
        if self.watchdog_interval is not None:
            self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> None:
        """Ask for ``seconds`` more from now to finish starting, reloading or stopping."""
        self.send(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def reloading(self) -> None:
        self.send(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self.send("STOPPING=1")


def watchdog_usec_from_environ(env: Mapping[str, str], pid: int) -> int | None:
    """WATCHDOG_USEC when it is meant for process ``pid`` (WATCHDOG_PID absent or equal), else None."""
    meant_for = env.get("WATCHDOG_PID")
    if meant_for and meant_for.strip() != str(pid):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec if usec > 0 else None


def notifier_from_environ(env: Mapping[str, str], pid: int | None = None) -> Notifier:
    """A SystemdNotifier when systemd gave us a socket, else a NullNotifier; ``pid`` defaults to ours."""
    address = env.get("NOTIFY_SOCKET", "")
    if not address:
        return NullNotifier()
    if not address.startswith(("/", "@")):
        log.warning("sdnotify.unsupported_socket", socket=address, next="carrying on without notifying the supervisor")
        return NullNotifier()
    return SystemdNotifier(address, watchdog_usec_from_environ(env, os.getpid() if pid is None else pid))
