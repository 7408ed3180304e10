"""Peer-message sealing (``kvstore.node.wire_crypto``): what D1's fence relies on.

A message must open only under the cluster's secret and only unaltered, and a sender must never
reuse a nonce under one key: the counter grows per process, and each process has its own key.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvstore.node.wire_crypto import (
    HEADER_BYTES,
    PEER_KEYS_KEPT,
    SALT_BYTES,
    WireCrypto,
    WireDecryptError,
)

SECRET = "unit-test-secret"


@pytest.fixture(scope="module")
def pair() -> tuple[WireCrypto, WireCrypto]:
    """Two processes of one cluster (PBKDF2 is slow: derive once)."""
    return WireCrypto(SECRET), WireCrypto(SECRET)


@given(data=st.binary(max_size=2048))
def test_a_message_opens_on_any_node_of_the_cluster(pair: tuple[WireCrypto, WireCrypto], data: bytes) -> None:
    sender, receiver = pair
    assert receiver.decrypt(sender.encrypt_at_time(data, 0)) == data
    assert sender.decrypt(sender.encrypt_at_time(data, 0)) == data


def test_a_wrong_secret_does_not_open(pair: tuple[WireCrypto, WireCrypto]) -> None:
    token = WireCrypto("another-secret").encrypt_at_time(b"pickle bytes", 0)
    with pytest.raises(WireDecryptError):
        pair[1].decrypt(token)


@pytest.mark.parametrize("position", [0, SALT_BYTES, HEADER_BYTES, -1])
def test_any_altered_byte_is_refused(pair: tuple[WireCrypto, WireCrypto], position: int) -> None:
    """The salt (key), the counter (nonce), the ciphertext and the tag are all authenticated."""
    sender, receiver = pair
    token = bytearray(sender.encrypt_at_time(b"append_entries", 0))
    token[position] ^= 1
    with pytest.raises(WireDecryptError):
        receiver.decrypt(bytes(token))


@pytest.mark.parametrize("length", [0, 1, HEADER_BYTES - 1, HEADER_BYTES, HEADER_BYTES + 15])
def test_truncated_messages_are_refused(pair: tuple[WireCrypto, WireCrypto], length: int) -> None:
    sender, receiver = pair
    token = sender.encrypt_at_time(b"append_entries", 0)[:length]
    with pytest.raises(WireDecryptError):
        receiver.decrypt(token)


def test_the_timestamp_pysyncobj_checks_is_a_counter_that_only_grows(
        pair: tuple[WireCrypto, WireCrypto]) -> None:
    """PySyncObj drops a connection whose timestamps go backwards: replays are refused."""
    sender, receiver = pair
    stamps = [receiver.extract_timestamp(sender.encrypt_at_time(b"m", 0)) for _ in range(100)]
    assert stamps == sorted(set(stamps))


def test_each_process_seals_under_its_own_key(pair: tuple[WireCrypto, WireCrypto]) -> None:
    """Two processes may use the same counter values; their salts (keys) differ, so no
    (key, nonce) pair is ever used twice."""
    first, second = pair
    a, b = first.encrypt_at_time(b"m", 0), second.encrypt_at_time(b"m", 0)
    assert a[:SALT_BYTES] != b[:SALT_BYTES]


def test_garbage_with_fresh_salts_does_not_evict_genuine_peers(pair: tuple[WireCrypto, WireCrypto]) -> None:
    """Only a key that opened a genuine message is remembered."""
    sender, receiver = pair
    receiver.decrypt(sender.encrypt_at_time(b"hello", 0))
    known = dict(receiver._openers)
    for i in range(PEER_KEYS_KEPT + 5):
        with pytest.raises(WireDecryptError):
            receiver.decrypt(i.to_bytes(SALT_BYTES, "big") + bytes(40))
    assert dict(receiver._openers) == known
