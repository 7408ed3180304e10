"""Builders for commands: ``ops.put(b"k", b"v")`` instead of nested protobuf constructors."""

from __future__ import annotations

from collections.abc import Iterable

from kvstore.proto import log_pb2 as pb

Command = pb.Command


def put(key: bytes, value: bytes) -> Command:
    return Command(put=pb.Put(key=key, value=value))


def put_many(pairs: Iterable[tuple[bytes, bytes]]) -> Command:
    """Many puts as one command (one log entry): for loading data in bulk."""
    return Command(put_many=pb.PutMany(kvs=[pb.KeyValue(key=k, value=v) for k, v in pairs]))


def delete(key: bytes, *, prefix: bool = False) -> Command:
    return Command(delete=pb.Delete(key=key, prefix=prefix))


def get(key: bytes) -> Command:
    return Command(get=pb.Get(key=key))


def range_(prefix: bytes = b"", *, limit: int = 0, keys_only: bool = False) -> Command:
    return Command(range=pb.Range(prefix=prefix, limit=limit, keys_only=keys_only))


def incr(key: bytes, delta: int = 1) -> Command:
    return Command(incr=pb.Incr(key=key, delta=delta))


def append(key: bytes, value: bytes) -> Command:
    return Command(append=pb.Append(key=key, value=value))


def cas(key: bytes, value: bytes, *, expected: bytes | None) -> Command:
    """Swap in ``value`` if the key holds ``expected`` (``None``: if the key is absent)."""
    if expected is None:
        return Command(cas=pb.Cas(key=key, expect_absent=True, value=value))
    return Command(cas=pb.Cas(key=key, expected=expected, value=value))
