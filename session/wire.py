"""Decoding untrusted protobuf bytes the same way under every protobuf backend.

Two protobuf backends exist: the C one (upb, the default) and the pure-Python one (PyPy and
platforms without a upb wheel fall back to it). They report bad bytes with different exceptions
(the Python one raises ``UnicodeDecodeError`` for a string that is not UTF-8), and, worse, they
disagree on some unusual but valid bytes: a padded tag, a field number out of range, deeply
nested unknown groups. Replicas on different backends must still decide every entry alike, so:

* ``parse`` maps every failure to one ``WireDecodeError``;
* ``parse_canonical`` also requires the bytes to be exactly what our encoder writes (no unknown
  fields, no padding), which is the same set of bytes under every backend. The log only ever
  holds entries our own encoder wrote, so nothing valid is lost;
* ``decode_varint_fields`` reads a message made only of varint fields (the session) by hand,
  so that "any valid encoding" means the same thing everywhere.
"""

from __future__ import annotations

from typing import TypeVar

from google.protobuf.message import DecodeError, Message

M = TypeVar("M", bound=Message)

MAX_FIELD_NUMBER = 2**29 - 1
MAX_GROUP_DEPTH = 32
_VARINT, _FIXED64, _LENGTH_DELIMITED, _START_GROUP, _END_GROUP, _FIXED32 = 0, 1, 2, 3, 4, 5


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


def parse_canonical(message_type: type[M], data: bytes) -> M:
    """Parses bytes that must be the canonical (deterministic) encoding of ``message_type``.

    The error message is the same under every backend, so replicas that refuse an entry also
    return the same result bytes.
    """
    name = message_type.DESCRIPTOR.name
    try:
        message = parse(message_type, data)
    except WireDecodeError as exc:
        raise WireDecodeError(f"not a valid {name} encoding") from exc.__cause__
    message.DiscardUnknownFields()
    if message.SerializeToString(deterministic=True) != bytes(data):
        raise WireDecodeError(f"not the canonical encoding of a {name}")
    return message


def decode_varint_fields(data: bytes, known: range) -> dict[int, int]:
    """The last value of each field in ``known`` of a message whose known fields are varints.

    Accepts any valid encoding: fields in any order, repeated (the last wins), padded varints,
    unknown fields of every wire type (skipped). Raises ``WireDecodeError`` for truncated bytes,
    an invalid tag, a value over 64 bits, or a known field with another wire type.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireDecodeError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    values: dict[int, int] = {}
    pos, groups = 0, []
    while pos < len(data):
        tag, pos = _varint(data, pos)
        field, wire_type = tag >> 3, tag & 7
        if not 1 <= field <= MAX_FIELD_NUMBER:
            raise WireDecodeError(f"invalid field number {field}")
        if field in known and not groups:
            if wire_type != _VARINT:
                raise WireDecodeError(f"field {field} has wire type {wire_type}, not varint")
            values[field], pos = _varint(data, pos)
        elif wire_type == _VARINT:
            _, pos = _varint(data, pos)
        elif wire_type == _FIXED64:
            pos = _skip(data, pos, 8)
        elif wire_type == _FIXED32:
            pos = _skip(data, pos, 4)
        elif wire_type == _LENGTH_DELIMITED:
            length, pos = _varint(data, pos)
            pos = _skip(data, pos, length)
        elif wire_type == _START_GROUP:
            if len(groups) >= MAX_GROUP_DEPTH:
                raise WireDecodeError("unknown groups nested too deep")
            groups.append(field)
        elif wire_type == _END_GROUP:
            if not groups or groups.pop() != field:
                raise WireDecodeError(f"unmatched end of group {field}")
        else:
            raise WireDecodeError(f"invalid wire type {wire_type}")
    if groups:
        raise WireDecodeError("unterminated group")
    return values


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    for i in range(10):
        if pos + i >= len(data):
            raise WireDecodeError("truncated varint")
        byte = data[pos + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if value >> 64:
                raise WireDecodeError("varint over 64 bits")
            return value, pos + i + 1
        shift += 7
    raise WireDecodeError("varint longer than 10 bytes")


def _skip(data: bytes, pos: int, length: int) -> int:
    if pos + length > len(data):
        raise WireDecodeError("field runs past the end")
    return pos + length
