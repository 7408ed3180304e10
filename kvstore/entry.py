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


def command_bytes(entry: bytes) -> bytes:
    """The command part of a canonical entry that has a session: its field 2, tag and length
    included (empty if it has no command). What a retry repeats byte for byte.

    Read from the bytes the log holds rather than re-encoded, so every replica digests the same
    bytes whatever its protobuf backend, and at the cost of a slice. The layout is fixed by
    ``decode_entry``, which accepts only the canonical encoding: field 1, the session, comes
    first, as the tag byte 0x0A and a one-byte length (a session is at most 44 bytes: four
    uint64 fields of at most 11 bytes each), then the command.
    """
    return entry[2 + entry[1] :]


def encode_batch(entries: Sequence[bytes]) -> bytes:
    """One replicated Raft entry holding several log entries (group commit)."""
    return EntryBatch(entries=entries).SerializeToString(deterministic=True)


def decode_batch(data: bytes) -> list[bytes]:
    """The entries of a batch; raises ``WireDecodeError`` for bytes ``encode_batch`` did not write."""
    return list(parse_canonical(EntryBatch, data).entries)
