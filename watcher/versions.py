"""The versions a file can be delivered in, and where each one comes from: one table for the whole package.

A *track* version is a full track (original, restored, mastered); a *stems* version is the stem split of one
of them. Each comes from one remote *product* of the archive plan (the upload, a restoration, a mastering, a
stem split), which the processing service names by its own *object type* (GET /status/{type}/{id}).
"""

from __future__ import annotations

from dataclasses import dataclass

# track -> the service's object type for it (as in GET /status/{type}/{id} and GET /download/{type}/{id})
TRACK_TYPES = {"original": "audio", "restored": "upscaled", "mastered": "mastered"}


@dataclass(frozen=True)
class Version:
    """One deliverable version: its name, whether it is a track, which track it is (or splits), its product."""

    name: str
    track: bool
    source: str  # original, restored or mastered: the track it is, or the track it splits
    product: str  # the archive plan's remote object: audio, restored, mastered, stems:<source>
    object_type: str  # the service's type of that object: audio, upscaled, mastered, stem_split


def _build() -> dict[str, Version]:
    table: dict[str, Version] = {}
    for source, object_type in TRACK_TYPES.items():
        table[source] = Version(
            source,
            track=True,
            source=source,
            product="audio" if source == "original" else source,
            object_type=object_type,
        )
        stems = f"{source}_stems"
        table[stems] = Version(stems, track=False, source=source, product=f"stems:{source}", object_type="stem_split")
    return table


VERSIONS = _build()
TRACK_VERSIONS = tuple(v.name for v in VERSIONS.values() if v.track)
STEM_VERSIONS = tuple(v.name for v in VERSIONS.values() if not v.track)

# What the gate and the spend ledger call the paid request that creates each product (stem splits keep theirs).
OPERATIONS = {"audio": "upload", "restored": "restore", "mastered": "master"}


def operation_of(product: str) -> str:
    """The paid operation that creates ``product``: upload, restore, master, or stems:<source>."""
    return OPERATIONS.get(product, product)


def operations_for(versions: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Every paid operation delivering ``versions`` takes, in the order they are made (none for no version)."""
    if not versions:
        return ()
    products = {"audio"}
    for name in versions:
        version = VERSIONS[name]
        products.add(VERSIONS[version.source].product)
        if not version.track:
            products.add(version.product)
    return tuple(operation_of(p) for p in PRODUCT_ORDER if p in products)


# Products in the order they are requested (each builds only on ones before it).
PRODUCT_ORDER = ("audio", "restored", "mastered", *(f"stems:{s}" for s in TRACK_TYPES))
OPERATION_ORDER = tuple(operation_of(p) for p in PRODUCT_ORDER)
