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
    """What the daemon tells its supervisor."""

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


class SystemdNotifier:
    """Datagrams to ``$NOTIFY_SOCKET`` (a path, or an abstract socket written ``@name``)."""

    def __init__(self, address: str, watchdog_usec: int | None = None) -> None:
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_interval = watchdog_usec / 2e6 if watchdog_usec else None
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._warned = False

    def send(self, message: str) -> None:
        try:
            self._sock.sendto(message.encode(), self.address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("sdnotify.send_failed", error=exc.strerror, next="carrying on without notifications")

    def close(self) -> None:
        self._sock.close()

    def ready(self) -> None:
        self.send("READY=1")

    def status(self, text: str) -> None:
        self.send("STATUS=" + text.replace("\n", " "))

    def watchdog(self) -> None:
        if self.watchdog_interval is not None:
            self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> None:
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def reloading(self) -> None:
        self.send(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self) -> None:
        self.send("STOPPING=1")


def notifier_from_environ(env: Mapping[str, str]) -> Notifier:
    """A SystemdNotifier when systemd gave us a socket, else a NullNotifier."""
    address = env.get("NOTIFY_SOCKET")
    if not address:
        return NullNotifier()
    usec = None
    if env.get("WATCHDOG_USEC") and env.get("WATCHDOG_PID", str(os.getpid())) == str(os.getpid()):
        try:
            usec = int(env["WATCHDOG_USEC"])
        except ValueError:
            usec = None
    return SystemdNotifier(address, usec)
