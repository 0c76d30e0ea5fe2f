"""The control socket: how `watcher scan`, `retry`, `pause`, `resume`, `status`, `web` and `backfill` reach a
running daemon.

A unix socket in the state folder (``state_dir/control.sock``, mode ``[control] mode``, group ``[control]
group``), served by :func:`asyncio.start_unix_server` in the daemon's own loop, so it works with the page off.
The protocol is JSON lines: the client sends one request ``{"command": NAME, ...}``; the daemon answers with
any number of ``{"progress": {...}}`` lines, then one ``{"ok": true, "result": ...}`` or ``{"ok": false,
"error": MESSAGE, "exit": CODE}``, and closes. Every command is carried out by the same functions in
:mod:`watcher.commands` as the page's.

The client (:func:`ask`) raises :class:`NoDaemon` only when nothing listens (no socket, or a stale one); a
socket it may not use (permissions) is a :class:`~watcher.errors.StartupError`, never a reason to work on the
store behind the daemon's back.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from watcher.errors import ConfigError, StartupError, WatcherError
from watcher.store.ports import StoreUnavailable

log = structlog.get_logger("watcher.control")
SOCKET_NAME = "control.sock"
MAX_REQUEST = 1 << 20  # bytes of one request line

Progress = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[[dict[str, Any], Progress], Awaitable[Any]]


def socket_path(state_dir: Path) -> Path:
    """Where the daemon of ``state_dir`` listens."""
    return state_dir / SOCKET_NAME


class NoDaemon(Exception):
    """Nothing listens on the control socket: no daemon runs on this state folder (or it is starting)."""


class CommandFailed(Exception):
    """The daemon refused or failed a command; ``exit`` is the exit code the CLI returns."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ControlServer:
    """Serves the control socket in the running loop; each connection is one request and its answer."""

    def __init__(self, path: Path, handle: Handler, *, mode: int = 0o660, group: str | None = None) -> None:
        self.path = path
        self.handle = handle
        self.mode = mode
        self.group = group
        self._running: set[asyncio.Future[Any]] = set()  # the commands being answered now
        self._cut: set[asyncio.Future[Any]] = set()  # those ended by cut(), told so
        self._server: asyncio.Server | None = None

    async def start(self) -> bool:
        """Listen (a socket left by a killed daemon is replaced: the caller holds the state folder's lock).
        False, logged, when the socket cannot be made: the daemon runs on, and the commands say why."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        try:
            # Made with the umask's bits (connecting needs write, which no usual umask gives others), then set.
            self._server = await asyncio.start_unix_server(self._client, path=str(self.path), limit=MAX_REQUEST)
            if self.group is not None:
                os.chown(self.path, -1, grp.getgrnam(self.group).gr_gid)
            os.chmod(self.path, self.mode)
        except (OSError, KeyError) as exc:
            why = f"no group named {self.group}" if isinstance(exc, KeyError) else (exc.strerror or str(exc))
            log.error(
                "control.not_started",
                socket=str(self.path),
                error=why,
                next="running without the control socket: commands cannot reach this daemon; fix [control] and restart",
            )
            await self.stop()
            return False
        log.debug("control.listening", socket=str(self.path), mode=oct(self.mode), group=self.group)
        return True

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def cut(self) -> None:
        """The daemon's graph is about to close (a stop or a reload): end the commands running on it now; each
        tells its client it was cut and to run it again (what it did is kept)."""
        for task in self._running:
            self._cut.add(task)
            task.cancel()

    async def _answer(self, request: dict[str, Any], send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        """Run one request and send its answer (or why not, with the exit code the CLI passes on)."""
        command = request.get("command")
        task = asyncio.ensure_future(self.handle(request, lambda p: send({"progress": p})))
        self._running.add(task)
        try:
            result = await task
        except asyncio.CancelledError:
            if task not in self._cut:
                raise  # this connection itself was cancelled (the socket closes): nothing to answer
            log.info("control.cut", command=command, next="the client is told to run it again")
            await send({"ok": False, "exit": 1, "error": f"the daemon stopped or reloaded before `{command}` "
                        "finished; what it did is kept: run it again"})  # fmt: skip
        except StartupError as exc:
            await send({"ok": False, "error": str(exc), "exit": 3})
        except StoreUnavailable as exc:  # an outage: the daemon carries on; the command can be asked again
            log.warning("control.store_unreachable", command=command, error=str(exc),
                        next="refused; ask again once the store answers")  # fmt: skip
            await send({"ok": False, "exit": 3, "error": f"the store cannot be reached now ({exc}); the daemon "
                        "carries on and retries: run the command again once `watcher status` no longer says "
                        "\"store unreachable\""})  # fmt: skip
        except (ConfigError, WatcherError) as exc:
            await send({"ok": False, "error": str(exc), "exit": 2})
        except Exception as exc:
            log.exception("control.failed", command=command)
            await send({"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}", "exit": 1})
        else:
            await send({"ok": True, "result": result})
        finally:
            self._running.discard(task)
            self._cut.discard(task)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def send(doc: dict[str, Any]) -> None:
            writer.write(json.dumps(doc, default=str).encode() + b"\n")
            await writer.drain()

        try:
            line = await reader.readline()
            try:
                request = json.loads(line)
                if not isinstance(request, dict) or not isinstance(request.get("command"), str):
                    raise ValueError("not an object with a command")
            except ValueError as exc:
                await send({"ok": False, "error": f"bad request ({exc})", "exit": 2})
                return
            await self._answer(request, send)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass  # the client went away (Ctrl-C on `watcher scan`): nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def ask(
    state_dir: Path,
    request: dict[str, Any],
    *,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    connect_timeout: float = 5.0,
) -> Any:
    """Send one request to the daemon of ``state_dir`` and return its result.

    Raises NoDaemon when nothing listens, CommandFailed when the daemon refused the command, StartupError when
    the socket is there but not ours to use.
    """
    path = socket_path(state_dir)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(connect_timeout)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise NoDaemon(str(exc)) from None
        except PermissionError:
            raise StartupError(
                f"the daemon's control socket {path} is not ours to use (permission denied): run as the "
                "service's user, or as a member of the socket's group ([control] group, see the README)"
            ) from None
        except OSError as exc:
            if exc.errno in (errno.ENOTSOCK, errno.ECONNREFUSED):
                raise NoDaemon(str(exc)) from None
            raise
        sock.settimeout(None)  # a scan may take as long as its files do
        sock.sendall(json.dumps(request, default=str).encode() + b"\n")
        with sock.makefile("rb") as stream:
            for raw in stream:
                doc = json.loads(raw)
                if "progress" in doc:
                    if on_progress is not None:
                        on_progress(doc["progress"])
                    continue
                if doc.get("ok"):
                    return doc.get("result")
                raise CommandFailed(str(doc.get("error")), int(doc.get("exit", 1)))
        raise CommandFailed(f"the daemon closed the control socket {path} without an answer: it stopped or reloaded "
                            "before the command finished; what it did is kept: run it again", 1)  # fmt: skip
    finally:
        sock.close()
