"""The processing service as the archive pipeline sees it: the calls it makes and what their answers hold
(implemented by the Neural Analog client, watcher.services.neuralanalog)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol


class StatusLike(Protocol):
    """What a status poll says of a remote job."""

    @property
    def is_complete(self) -> bool: ...

    @property
    def is_failed(self) -> bool: ...

    @property
    def error_message(self) -> str | None: ...


class UploadBody(Protocol):
    """An upload's source: its name, its size and its bytes in chunks (never read whole)."""

    @property
    def name(self) -> str: ...

    @property
    def size(self) -> int: ...

    def chunks(self) -> AsyncIterator[bytes]: ...


class Processor(Protocol):
    """The processing service as the archive pipeline needs it (implemented by the Neural Analog client)."""

    async def upload(self, source: UploadBody) -> str: ...

    async def poll(self, kind: str, object_id: str) -> StatusLike:
        """The status of a remote job, within the service's share for polls (Deferred when its turn is later)."""
        ...

    async def restore(self, audio_id: str, params: Mapping[str, Any]) -> str: ...

    async def master(self, audio_id: str, params: Mapping[str, Any], upscaled_id: str | None = None) -> str: ...

    async def create_stems(self, source_field: str, source_id: str, params: Mapping[str, Any]) -> str: ...
