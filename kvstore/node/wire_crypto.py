"""Authenticated encryption of the messages between nodes: AES-GCM in place of PySyncObj's Fernet.

PySyncObj encrypts every peer message with Fernet (AES-CBC, HMAC-SHA256, base64) when a
password is set, and that is what keeps an impostor without the secret from getting a pickle
unpickled (D1). It costs 10-18 µs to encrypt and 18-23 µs to decrypt a 100-byte message here,
on every message, on the one tick thread that runs Raft. AES-GCM does the same job, secrecy
and integrity, in about 1 µs each way.

GCM has one hard rule: a nonce must never repeat under a key. Random 96-bit nonces are only
safe for about 2**32 messages per key, which a busy cluster sends in days. So each process draws
a random 128-bit salt when it starts and derives its own sending key from the cluster key and
that salt; its nonces are a counter under that key, so they never repeat. A message carries the
salt and the counter::

    salt (16 bytes) | counter (8 bytes, big-endian) | ciphertext and tag

PySyncObj asks the encryptor for a message's "timestamp" and drops a connection whose
timestamps go backwards; we hand it the counter, which makes that check refuse any replayed or
reordered message on a connection (a connection carries messages of one process).

Every node of a cluster must use this scheme; a plain PySyncObj node with the right password
cannot talk to ours.
"""

from __future__ import annotations

import itertools
import os
import struct
from collections import OrderedDict

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

CLUSTER_KEY_SALT = b"kvstore/raft-peer-key/v1"
CLUSTER_KEY_ITERATIONS = 100_000
"""PBKDF2 rounds from the secret to the cluster key: slows down guessing a weak secret."""
SALT_BYTES = 16
COUNTER = struct.Struct(">Q")
HEADER_BYTES = SALT_BYTES + COUNTER.size
NONCE_PREFIX = bytes(4)
"""The nonce is these 4 bytes and the 8-byte counter; the salt makes the key unique instead."""
PEER_KEYS_KEPT = 64
"""Sending keys of peer processes remembered (a restart of a peer brings a new salt)."""


class WireDecryptError(ValueError):
    """A message that was not sealed with this cluster's secret, or was altered."""


def cluster_key(secret: str) -> bytes:
    kdf = PBKDF2HMAC(algorithm=hashes.SHA256(), length=32, salt=CLUSTER_KEY_SALT,
                     iterations=CLUSTER_KEY_ITERATIONS)
    return kdf.derive(secret.encode())


def _process_key(key: bytes, salt: bytes) -> AESGCM:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=b"kvstore raft messages")
    return AESGCM(hkdf.derive(key))


class WireCrypto:
    """PySyncObj's encryptor interface (``encrypt_at_time``, ``extract_timestamp``, ``decrypt``)."""

    def __init__(self, secret: str) -> None:
        self._key = cluster_key(secret)
        self._salt = os.urandom(SALT_BYTES)
        self._sealer = _process_key(self._key, self._salt)
        self._counter = itertools.count(1)
        self._openers: OrderedDict[bytes, AESGCM] = OrderedDict()

    def encrypt_at_time(self, data: bytes, _current_time: int) -> bytes:
        header = self._salt + COUNTER.pack(next(self._counter))
        return header + self._sealer.encrypt(NONCE_PREFIX + header[SALT_BYTES:], data, None)

    def extract_timestamp(self, token: bytes) -> int:
        """The message's counter (not yet authenticated: ``decrypt`` checks it)."""
        if len(token) < HEADER_BYTES:
            raise WireDecryptError("message too short")
        return int(COUNTER.unpack_from(token, SALT_BYTES)[0])

    def decrypt(self, token: bytes) -> bytes:
        if len(token) < HEADER_BYTES:
            raise WireDecryptError("message too short")
        salt = bytes(token[:SALT_BYTES])
        opener = self._openers.get(salt) or _process_key(self._key, salt)
        try:
            data = opener.decrypt(NONCE_PREFIX + token[SALT_BYTES:HEADER_BYTES], token[HEADER_BYTES:],
                                  None)
        except InvalidTag:
            raise WireDecryptError("message not sealed with this cluster's secret") from None
        self._remember(salt, opener)  # only keys that opened a genuine message
        return data

    def _remember(self, salt: bytes, opener: AESGCM) -> None:
        if salt in self._openers:
            self._openers.move_to_end(salt)
            return
        self._openers[salt] = opener
        if len(self._openers) > PEER_KEYS_KEPT:
            self._openers.popitem(last=False)
