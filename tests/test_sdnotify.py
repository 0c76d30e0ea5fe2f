"""The notify protocol, received on real AF_UNIX datagram sockets as systemd would receive it."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from watcher.sdnotify import NullNotifier, SystemdNotifier, notifier_from_environ, watchdog_usec_from_environ


def receive(sock: socket.socket) -> str:
    """One datagram, waited for with a deadline (the socket has a timeout)."""
    return sock.recv(4096).decode()


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound to a file, like systemd's /run/systemd/notify."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    yield sock, str(path)
    sock.close()


def test_messages_reach_a_path_socket(path_socket):
    """READY, STATUS, WATCHDOG, EXTEND_TIMEOUT_USEC, STOPPING arrive one datagram each, as written."""
    sock, path = path_socket
    notifier = notifier_from_environ({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "60000000"})
    assert isinstance(notifier, SystemdNotifier)
    try:
        notifier.ready()
        notifier.status("3 queued,\n1 in progress")
        notifier.watchdog()
        notifier.extend_timeout(10.5)
        notifier.stopping()
        got = [receive(sock) for _ in range(5)]
    finally:
        notifier.close()
    assert got == [
        "READY=1",
        "STATUS=3 queued, 1 in progress",
        "WATCHDOG=1",
        "EXTEND_TIMEOUT_USEC=10500000",
        "STOPPING=1",
    ]
    assert notifier.watchdog_interval == 30.0


def test_reloading_carries_the_monotonic_clock(path_socket):
    """RELOADING=1 comes with MONOTONIC_USEC, read from CLOCK_MONOTONIC as systemd requires."""
    sock, path = path_socket
    notifier = notifier_from_environ({"NOTIFY_SOCKET": path})
    try:
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        notifier.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        lines = receive(sock).split("\n")
    finally:
        notifier.close()
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC" and before <= int(value) <= after


def test_messages_reach_an_abstract_socket():
    """An ``@name`` address is the abstract socket ``\\0name``."""
    name = f"watcher-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    notifier = notifier_from_environ({"NOTIFY_SOCKET": "@" + name})
    try:
        notifier.ready()
        notifier.status("ready")
        assert [receive(sock), receive(sock)] == ["READY=1", "STATUS=ready"]
    finally:
        notifier.close()
        sock.close()


def test_no_watchdog_means_no_pings(path_socket):
    """Without WATCHDOG_USEC there is no interval and watchdog() sends nothing."""
    sock, path = path_socket
    notifier = notifier_from_environ({"NOTIFY_SOCKET": path})
    try:
        assert notifier.watchdog_interval is None
        notifier.watchdog()
        notifier.ready()
        assert receive(sock) == "READY=1"
    finally:
        notifier.close()


def test_watchdog_is_for_our_process_only():
    """WATCHDOG_PID naming another process (we were forked from the main one) turns the watchdog off."""
    env = {"WATCHDOG_USEC": "20000000"}
    assert watchdog_usec_from_environ(env, pid=42) == 20_000_000
    assert watchdog_usec_from_environ({**env, "WATCHDOG_PID": "42"}, pid=42) == 20_000_000
    assert watchdog_usec_from_environ({**env, "WATCHDOG_PID": "43"}, pid=42) is None
    assert watchdog_usec_from_environ({"WATCHDOG_USEC": "soon"}, pid=42) is None
    assert watchdog_usec_from_environ({"WATCHDOG_USEC": "0"}, pid=42) is None
    n = notifier_from_environ({"NOTIFY_SOCKET": "@x", **env, "WATCHDOG_PID": str(os.getpid())})
    assert n.watchdog_interval == 10.0
    n.close()


def test_without_a_socket_the_null_object_is_used():
    """No NOTIFY_SOCKET (not under systemd) or an unsupported kind of address gives the null notifier."""
    assert isinstance(notifier_from_environ({}), NullNotifier)
    with structlog.testing.capture_logs() as logs:
        notifier = notifier_from_environ({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert isinstance(notifier, NullNotifier)
    assert [e["event"] for e in logs] == ["sdnotify.unsupported_socket"]
    notifier.ready()
    notifier.watchdog()
    notifier.reloading()
    notifier.close()


def test_a_vanished_socket_is_logged_once_and_never_raises(tmp_path):
    """Sending to a socket that is not there logs one warning for any number of messages."""
    notifier = SystemdNotifier(str(tmp_path / "gone"), watchdog_usec=1_000_000)
    try:
        with structlog.testing.capture_logs() as logs:
            notifier.ready()
            notifier.watchdog()
            notifier.status("x")
            assert notifier.send("READY=1") is False
    finally:
        notifier.close()
    assert [e["event"] for e in logs] == ["sdnotify.send_failed"]
    assert logs[0]["log_level"] == "warning"
