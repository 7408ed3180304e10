"""Log entries: a session plus a command, as the bytes that PySyncObj replicates."""

from __future__ import annotations

from collections.abc import Sequence

from kvstore.proto.log_pb2 import Command, Entry, EntryBatch
from session.session import Session
from session.wire import parse_canonical


def encode_entry(session: Session, command: Command | None = None) -> bytes:
    """The entry bytes for ``session`` proposing ``command`` (none for register/unregister)."""
    entry = Entry(session=session.to_pb())
    if command is not None:
        entry.command.CopyFrom(command)
    # A command decoded from a client's request may carry fields this version does not know;
    # they are dropped here, as protobuf readers do, so the log only holds canonical entries
    # (``decode_entry`` refuses anything else).
    entry.DiscardUnknownFields()
    return entry.SerializeToString(deterministic=True)


def decode_entry(data: bytes) -> Entry:
    """Parses entry bytes; raises ``session.wire.WireDecodeError`` unless they are exactly what
    ``encode_entry`` writes (so every protobuf backend accepts the same entries)."""
    return parse_canonical(Entry, data)


def encode_batch(entries: Sequence[bytes]) -> bytes:
    """One replicated Raft entry holding several log entries (group commit)."""
    return EntryBatch(entries=entries).SerializeToString(deterministic=True)


def decode_batch(data: bytes) -> list[bytes]:
    """The entries of a batch; raises ``WireDecodeError`` for bytes ``encode_batch`` did not write."""
    return list(parse_canonical(EntryBatch, data).entries)
