"""A replicated key-value store with exactly-once client sessions."""

from kvstore.entry import decode_entry, encode_entry
from kvstore.snapshot import SnapshotError
from kvstore.state_machine import StateMachine

__all__ = ["SnapshotError", "StateMachine", "decode_entry", "encode_entry"]
