"""Decoding untrusted protobuf bytes, the same way under every protobuf backend.

protobuf's C backend (upb) reports bad bytes as ``DecodeError``; the pure-Python backend
(``PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python``) also raises ``UnicodeDecodeError`` for a
string field that is not UTF-8, and other built-in exceptions for some truncations. Callers
that must never crash on input (the state machine's apply, the API server) need one error
type whatever the backend, and this is the one place that maps them.
"""

from __future__ import annotations

from typing import TypeVar

from google.protobuf.message import DecodeError, Message

M = TypeVar("M", bound=Message)


class WireDecodeError(ValueError):
    """Bytes that are not a valid encoding of the expected message."""


def parse(message_type: type[M], data: bytes) -> M:
    """Parses ``data`` as ``message_type`` or raises ``WireDecodeError``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireDecodeError(f"expected bytes, got {type(data).__name__}")
    message = message_type()
    try:
        message.ParseFromString(bytes(data))
    except (DecodeError, UnicodeDecodeError) as exc:
        raise WireDecodeError(f"not a valid {message_type.DESCRIPTOR.name}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - backend-specific failures on hostile bytes
        raise WireDecodeError(
            f"not a valid {message_type.DESCRIPTOR.name}: {type(exc).__name__}: {exc}"
        ) from exc
    return message
