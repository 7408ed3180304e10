"""Snapshots as the build before command digests wrote them (format version 1), for the tests
of the upgrade path: such a snapshot must still restore, and its cached results, which have no
digest, keep answering every copy of their series id from the cache until acknowledged."""

from __future__ import annotations

from kvstore.proto.log_pb2 import Snapshot

GOLDEN_CLUSTER = 5
GOLDEN_VERSION_1 = bytes.fromhex(
    "080110051808220a081e1a06080112022802220a08141a060801120228062208080a10011a0208022a060a016b"
    "1201762a060a016e120133"
)
"""Written by main at d936a06, before digests, in cluster 5 with capacity 8: sessions 30, 10
and 20 registered in that order, each proposed series 1 ``incr n`` (answers 1, 2, 3), then
session 10 proposed series 2 ``put k v`` with responded_to 1. LRU order: 30, 20, 10."""


def as_version_1(image: bytes) -> bytes:
    """The same state as the build before digests would have written it: version 1, and no
    cached result has a command digest."""
    snapshot = Snapshot.FromString(image)
    snapshot.format_version = 1
    for record in snapshot.sessions:
        for cached in record.responses:
            cached.ClearField("command_digest")
    return snapshot.SerializeToString(deterministic=True)
