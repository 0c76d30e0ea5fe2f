"""The archive plan: which remote products the configured versions need, in the order they build on each other.

Each product (the upload, a restoration, a mastering, a stem split) is one paid operation at the gate, keyed by
its parameters and by the chain of products it builds on, so a change of parameters is new work and the same
parameters are never paid twice.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from watcher.config import ArchiveConfig
from watcher.store import Operation
from watcher.versions import TRACK_TYPES, VERSIONS, operation_of


@dataclass(frozen=True)
class Op:
    """One remote object the versions need: its name, status kind, dependency and parameters."""

    name: str  # audio, restored, mastered, stems:original, stems:restored, stems:mastered
    status_kind: str  # as in GET /status/{kind}/{id}
    needs: str | None
    params: Mapping[str, Any]

    def key(self, plan: Mapping[str, Op]) -> str:
        """Parameters and the chain they build on, as a stable string: part of the store's key."""
        chain: list[Any] = []
        op: Op | None = self
        while op is not None:
            chain.append([op.name, dict(op.params)])
            op = plan.get(op.needs) if op.needs else None
        return hashlib.sha256(json.dumps(chain, sort_keys=True).encode()).hexdigest()[:16]


def plan_ops(cfg: ArchiveConfig) -> dict[str, Op]:
    """The remote objects needed for the configured versions, in dependency order."""
    wanted = cfg.wanted()
    params = {"restored": cfg.restore, "mastered": cfg.master}
    ops: dict[str, Op] = {"audio": Op("audio", TRACK_TYPES["original"], None, {})}
    sources = {VERSIONS[v].source for v in wanted}
    for track in ("restored", "mastered"):  # in dependency order: both build on the upload only
        if track in sources:
            ops[track] = Op(track, TRACK_TYPES[track], "audio", params[track])
    for v in wanted:
        version = VERSIONS[v]
        if not version.track:
            needs = VERSIONS[version.source].product
            ops[version.product] = Op(version.product, version.object_type, needs, cfg.stems)
    return ops


def operation(plan: Mapping[str, Op], sha256: str, where: str, name: str) -> Operation:
    """The gate's identity of product ``name`` of the plan for this content at this service (``where``).

    Uploads in doubt are re-sent (they create an object, not paid work); anything else in doubt is held.
    """
    return Operation(sha256, where, operation_of(name), plan[name].key(plan), "reask" if name == "audio" else "hold")
