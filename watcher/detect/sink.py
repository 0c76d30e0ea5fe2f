"""What detection hands over: a settled revision (:class:`Settled`), and the sink that records it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from watcher.audiofile import Signature
from watcher.config import FolderConfig
from watcher.detect.scan import Recorded


@dataclass(frozen=True)
class Settled:
    """One settled revision, as the sink records it."""

    folder: FolderConfig
    path: str
    rel_path: str
    signature: Signature
    live: bool = False  # found as it arrived (an event, a poll, `watcher scan PATH`, a recent mtime): goes first


class ReadySink(Protocol):
    """Where settled files go (the store); ``known`` and ``recorded`` are asked off the loop; ``ready`` and
    ``ready_many`` are awaited on it (the store's own threads do the writing)."""

    def known(self, path: str, sig: Signature) -> bool:
        """True when this exact revision was already recorded (no need to wait for it to settle)."""
        ...

    async def ready(
        self, folder: FolderConfig, path: str, rel_path: str, sig: Signature, *, live: bool = False
    ) -> None:
        """A revision that stayed unchanged for its folder's settle window (``live``: see :class:`Settled`)."""
        ...

    async def ready_many(self, files: Sequence[Settled]) -> None:
        """Several settled revisions at once, all or none (one transaction): when it raises, none is recorded."""
        ...

    def recorded(self, folder: str) -> Recorded:
        """Every revision recorded as current under ``folder``, in one answer (what a whole-folder scan skips)."""
        ...
