"""The outage journal: paid answers that arrived while the store could not be written, kept on local disk.

One file in the state folder, one line per record: ``<crc32 hex> <compact JSON>\\n``, appended and fsynced before
the answer counts as kept. A line cut short by a kill (no newline, or a checksum that does not match) ends the
journal: it and anything after it are ignored, and cut off at the next open so later records follow a whole line.
The journal is bounded (``max_bytes``): once full, it still takes the answers of calls already sent, but says
``full`` so that no new paid call starts. After every record was replayed into the store, :meth:`clear` empties it.
"""

from __future__ import annotations

import json
import os
import threading
import zlib
from pathlib import Path
from typing import Any

from watcher.fsutil import fsync_dir
from watcher.store.models import Fence, Operation, StoredResult

JOURNAL_NAME = "outage-journal"
MAX_BYTES = 4 * 1024 * 1024  # about ten thousand answers: far more than the calls a node has in flight at once


def _line(record: dict[str, Any]) -> bytes:
    """One record as its line: checksum, space, compact JSON, newline."""
    payload = json.dumps(record, separators=(",", ":"), sort_keys=True, ensure_ascii=True).encode()
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def _parse(data: bytes) -> tuple[list[dict[str, Any]], int]:
    """The whole records at the start of ``data``, and where the last of them ends (a torn tail is left out)."""
    records: list[dict[str, Any]] = []
    end = 0
    while end < len(data):
        newline = data.find(b"\n", end)
        if newline < 0:
            break  # cut short by a kill: no newline
        line = data[end:newline]
        crc, _, payload = line.partition(b" ")
        try:
            if int(crc, 16) != zlib.crc32(payload):
                break
            record = json.loads(payload)
        except ValueError:
            break
        if not isinstance(record, dict):
            break
        records.append(record)
        end = newline + 1
    return records, end


class Journal:
    """Append-only, fsynced, bounded; safe to share between the event loop and worker threads of one process."""

    def __init__(self, path: Path, *, max_bytes: int = MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._records: list[dict[str, Any]] = []
        self._size = 0
        self.dropped_tail = 0  # bytes of a torn last record found (and cut off) at open
        if path.exists():
            data = path.read_bytes()
            self._records, end = _parse(data)
            self.dropped_tail = len(data) - end
            if self.dropped_tail:
                with open(path, "r+b") as f:
                    f.truncate(end)
                    os.fsync(f.fileno())
            self._size = end

    def __len__(self) -> int:
        """How many whole records it holds."""
        with self._lock:
            return len(self._records)

    @property
    def full(self) -> bool:
        """No new paid call may start: the answers it would bring might find no room."""
        with self._lock:
            return self._size >= self.max_bytes

    def records(self) -> list[dict[str, Any]]:
        """Every whole record, oldest first."""
        with self._lock:
            return list(self._records)

    def append(self, record: dict[str, Any]) -> None:
        """Write one record and fsync it; raises OSError (a full disk, a read-only folder) when it is not kept."""
        line = _line(record)
        with self._lock:
            if self._fd is None:
                created = not self.path.exists()
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                if created:  # the file's name must survive a power cut too
                    fsync_dir(self.path.parent)
            try:
                written = os.write(self._fd, line)
                if written != len(line):
                    raise OSError(f"short write to {self.path} ({written} of {len(line)} bytes)")
                os.fsync(self._fd)
            except OSError:
                os.ftruncate(self._fd, self._size)  # a partial line would end the journal at the next open
                raise
            self._records.append(record)
            self._size += len(line)

    def clear(self, count: int) -> None:
        """Forget the first ``count`` records (replayed into the store); the rest stay, rewritten atomically."""
        with self._lock:
            rest = self._records[count:]
            if not rest:
                fd = self._fd if self._fd is not None else os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
                os.ftruncate(fd, 0)
                os.fsync(fd)
                if fd is not self._fd:
                    os.close(fd)
                self._records, self._size = [], 0
                return
            tmp = self.path.with_name(self.path.name + ".tmp")
            data = b"".join(_line(r) for r in rest)
            with open(tmp, "wb") as f:
                f.write(data)
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            fsync_dir(self.path.parent)
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._records, self._size = rest, len(data)

    def close(self) -> None:
        """Close the file (its records stay for the next open)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _op(op: Operation) -> list[str]:
    """An operation as a record holds it."""
    return [op.sha256, op.service, op.name, op.params, op.on_doubt]


def _fence(fence: Fence | None) -> list[Any] | None:
    """A fence as a record holds it."""
    return None if fence is None else [fence.holder, fence.generation]


def encode(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """One paid answer call as a journal record (the call's own arguments, named)."""
    if name == "gate_answered":
        op, result = args[0], (args[1] if len(args) > 1 else kwargs.get("result"))
        return {"kind": name, "op": _op(op), "result": result, "fence": _fence(kwargs["fence"])}
    if name == "gate_release":
        op, state = args
        return {
            "kind": name,
            "op": _op(op),
            "state": state,
            "fence": _fence(kwargs["fence"]),
            "error": kwargs.get("error"),
        }
    if name == "save_result":
        sha256, backend, result = args[:3]
        op = args[3] if len(args) > 3 else kwargs.get("op")
        fence = args[4] if len(args) > 4 else kwargs.get("fence")
        return {
            "kind": name,
            "sha256": sha256,
            "backend": backend,
            "result": [
                result.requested,
                result.model_name,
                result.model_version,
                result.correlation_id,
                result.results,
            ],
            "op": None if op is None else _op(op),
            "fence": _fence(fence),
        }
    request, ending = args
    return {"kind": name, "request": request, "ending": ending}


def apply(store: Any, record: dict[str, Any]) -> bool:
    """Replay one record into ``store``; False when its take had lost the operation meanwhile (late)."""
    kind = record["kind"]
    op = Operation(*record["op"]) if record.get("op") else None
    fence = Fence(*record["fence"]) if record.get("fence") else None
    if kind == "gate_answered":
        return bool(store.gate_answered(op, record["result"], fence=fence))
    if kind == "gate_release":
        return bool(store.gate_release(op, record["state"], fence=fence, error=record["error"]))
    if kind == "save_result":
        return bool(store.save_result(record["sha256"], record["backend"], StoredResult(*record["result"]), op, fence))
    # a journal an earlier release wrote says ledger_outcome and outcome: replayed the same
    store.ledger_ending(record["request"], record["ending"] if "ending" in record else record["outcome"])
    return True
